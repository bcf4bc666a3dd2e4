"""How the tab shows service answers: table rows, progress, issues, plans, reports, the delivery stamp.

Pure functions over the JSON-ready dicts the services return (no gradio here), so they are tested directly.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterable
from typing import Any

from kohya_backend.errors import ConfigError, DatasetError, TrainManagementError
from kohya_backend.families import FAMILIES, OTHER_FAMILY_LABELS, family_label
from kohya_backend.jobs.states import JobStatus

FM_LABELS: dict[str, str] = {family.label: name for name, family in FAMILIES.items()}
FAMILY_LABELS: dict[str, str] = {name: family_label(name) for name in (*FAMILIES, *OTHER_FAMILY_LABELS)}
# Status and progress first: they are what a narrow window must still show (the table scrolls sideways inside
# itself for the rest); the id, which a click on a row selects by, comes last.
JOB_HEADERS: list[str] = [
    "status", "progress", "output name", "loss", "it/s", "ETA", "created", "instance", "model", "dataset", "id",
]  # fmt: skip
JOB_ID_COLUMN = JOB_HEADERS.index("id")
WORKER_HEADERS: list[str] = ["name", "state", "GPU", "free disk", "URL"]
_BUSY = frozenset(status.value for status in JobStatus.busy())  # rows of these show it/s and ETA
_INSTANCE = re.compile(r"\[([^\[\]]+)\]$")


def fm_type_of(label: str | None) -> str:
    """The FM type ('sd_1_5', 'sd_xl') of a radio label ('SD 1.5', 'SDXL'); a type passes through."""
    if label in FM_LABELS.values():
        return str(label)
    try:
        return FM_LABELS[str(label)]
    except KeyError:
        raise TrainManagementError(
            f"FM type {label!r} is unknown", f"choose one of: {', '.join(FM_LABELS)}"
        ) from None


def fm_label_of(fm_type: str) -> str:
    """The radio label of an FM type."""
    return next(label for label, value in FM_LABELS.items() if value == fm_type)


def instance_choice(entry: dict[str, Any]) -> str:
    """The dropdown text of an instance type: 'this machine (CPU) [local]'."""
    return f"{entry['label']} [{entry['name']}]"


def instance_name(choice: str | None) -> str:
    """The runner name inside an instance-type choice (a bare name passes through)."""
    text = (choice or "").strip()
    found = _INSTANCE.search(text)
    if found:
        return found.group(1)
    if not text:
        raise TrainManagementError("no Training Instance Type is selected", "choose where to train")
    return text


def _number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else ""


def duration(seconds: Any) -> str:
    """H:MM:SS, or '' when unknown."""
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return ""
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def progress_text(job: dict[str, Any]) -> str:
    """'step/total (pct%)', the phase before the first step, or a queued job's place in the queue (and why it
    waits, e.g. for the WebUI to finish generating)."""
    progress = job.get("progress") or {}
    total = progress.get("total_steps") or ((job.get("plan") or {}).get("total_steps"))
    step = progress.get("step")
    if job["status"] == JobStatus.QUEUED.value:
        place = f"#{job['queue_position']} in queue" if job.get("queue_position") else "in queue"
        phase = progress.get("phase")
        return f"{place}: {phase}" if phase and phase != "queued" else place
    if step is None:
        phase = progress.get("phase")
        return str(phase) if phase and job["status"] != "completed" and phase != "queued" else ""
    if total:
        return f"{step}/{total} ({100 * step / total:.0f}%)"
    return str(step)


def job_row(job: dict[str, Any]) -> list[str]:
    """One Trainings List row (the order of JOB_HEADERS)."""
    progress = job.get("progress") or {}
    active = job["status"] in _BUSY
    stalled = job.get("stalled")
    row = {
        # A training whose trainer went silent (the API's `stalled`): say so where the status is read.
        "status": f"{job['status']} (stalled {duration(stalled.get('silent_s'))})"
        if stalled
        else job["status"],
        "progress": progress_text(job),
        "output name": job["output_name"],
        "loss": _number(progress.get("avg_loss", progress.get("loss")), 4),
        "it/s": _number(progress.get("it_per_s"), 2) if active else "",
        "ETA": duration(progress.get("eta_s")) if active else "",
        "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created_at"])),
        "instance": job["instance_type"],
        "model": job["model"],
        "dataset": job["dataset"],
        "id": job["id"],
    }
    return [row[header] for header in JOB_HEADERS]


def delivery_stamp(jobs: Iterable[dict[str, Any]]) -> str:
    """The stamp's HTML: the newest completed job that delivered a LoRA and where (changes at each delivery)."""
    for job in jobs:
        delivered = (job.get("progress") or {}).get("delivered")
        if job["status"] == "completed" and delivered:
            return f"<span>{html.escape(job['id'])} {html.escape(str(delivered))}</span>"
    return "<span></span>"


def error_markdown(exc: TrainManagementError) -> str:
    """An error as the tab shows it: what is wrong, each issue or file, and the hint."""
    if isinstance(exc, ConfigError):
        lines = [f"**config_params has {len(exc.issues)} problem(s):**"]
        lines += [f"- {issue.render()}" for issue in exc.issues]
        return "\n".join(lines)
    text = f"**{exc.message}**"
    if isinstance(exc, DatasetError) and exc.files:
        text += "\n\n" + "\n".join(f"- `{f}`" for f in exc.files[:20])
    hint = exc.web_hint or exc.hint  # what to do in the page, when it differs from the command line's way
    if hint:
        text += f"\n\nHint: {hint}"
    return text


def warnings_markdown(warnings: list[dict[str, Any]]) -> str:
    """Config warnings (ConfigIssue dicts) as a list with their lines."""
    lines = []
    for warning in warnings:
        where = f"line {warning['line']}: " if warning.get("line") else ""
        key = f"{warning['key']}: " if warning.get("key") else ""
        lines.append(f"- warning: {where}{key}{warning['message']}")
    return "\n".join(lines)


def plan_markdown(formatted: dict[str, Any]) -> str:
    """The plan of a formatted config: images, repeats, steps per epoch, total steps (or why there is none)."""
    plan = formatted.get("plan")
    if formatted.get("dataset_error"):
        error = formatted["dataset_error"]
        files = "".join(f"\n- `{f}`" for f in error.get("files", [])[:20])
        return f"**The dataset cannot be trained on:** {error['message']}{files}"
    if not plan:
        return "Choose a dataset to see the plan."
    folders = "\n".join(
        f"| {f['name']} | {f['images']} | {f['repeats']} | {f['images'] * f['repeats']} |"
        for f in plan["folders"]
    )
    processes = int(plan.get("num_processes") or 1)
    batch = f"batch size {plan['batch_size']}" + (
        f" per process x **{processes}** processes (GPUs)" if processes > 1 else ""
    )
    return (
        "| folder | images | repeats | images x repeats |\n|---|---|---|---|\n"
        f"{folders}\n\n"
        f"**{plan['num_train_images']}** training images with repeats, {batch}: "
        f"**{plan['steps_per_epoch']}** steps per epoch x **{plan['epochs']}** epoch(s) = "
        f"**{plan['total_steps']}** total steps"
    )


def report_markdown(report: dict[str, Any]) -> str:
    """A dataset validation report: ok with counts, or what is wrong and which files; then the warnings."""
    if report["ok"]:
        counts = ", ".join(
            f"`{name}`: {info['img_count']} x {info['n_repeats']}"
            for name, info in report.get("subsets", {}).items()
        )
        text = f"**OK**: {report.get('images', 0)} image(s), {report.get('train_items', 0)} with repeats ({counts})"
    else:
        text = f"**Problem:** {report['message']}"
        text += "".join(f"\n- `{f}`" for f in report["files"][:30])
        if report.get("hint"):
            text += f"\n\nHint: {report['hint']}"
    if report["warnings"]:
        text += "\n\n" + "\n".join(f"- warning: {w}" for w in report["warnings"])
    return text


def created_markdown(result: dict[str, Any]) -> str:
    """What creating a dataset did: images kept, preprocessing, files left out and why, and the report."""
    text = f"Created dataset **{result['name']}** with {len(result['images'])} image(s)"
    if result.get("preprocess"):
        text += f", preprocessed ({result['preprocess']})"
    skipped = result.get("skipped") or []
    if skipped:
        text += f"\n\nLeft out {len(skipped)} file(s):\n" + "\n".join(
            f"- `{s['file']}`: {s['reason']}" for s in skipped[:30]
        )
    return text + "\n\n" + report_markdown(result["report"])


def loss_rows(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """(step, value, series) rows of the loss plot: each step's loss and the running average."""
    rows = []
    for event in events:
        if event.get("kind") != "step" or not isinstance(event.get("step"), int):
            continue
        for series, key in (("loss", "loss"), ("average loss", "avg_loss")):
            if isinstance(event.get(key), (int, float)):
                rows.append({"step": event["step"], "value": float(event[key]), "series": series})
    return rows


def job_markdown(job: dict[str, Any]) -> str:
    """The selected job's headline: status with its reason, progress, where the LoRA went."""
    progress = job.get("progress") or {}
    text = f"**{job['id']}** `{job['output_name']}`: **{job['status']}**"
    if progress_text(job):
        text += f", {progress_text(job)}"
    if job.get("reason"):
        text += f"\n\n{job['reason']}"
    stalled = job.get("stalled")
    if stalled:
        tail = str(stalled.get("log_tail") or "").strip()
        text += (
            f"\n\n**Stalled**: no progress from the trainer for {duration(stalled.get('silent_s'))}; "
            "**Cancel** stops it at once."
        )
        if tail:
            text += f"\n\n```\n{tail}\n```"
    weights = progress.get("frozen_weights")
    if isinstance(weights, dict) and weights.get("message"):
        text += f"\n\nFrozen weights: {weights['message']}"
    if progress.get("delivered") and str(progress["delivered"]) not in (job.get("reason") or ""):
        text += f"\n\nLoRA: `{progress['delivered']}`"
    return text


def worker_state_text(worker: dict[str, Any]) -> str:
    """'online', 'busy, 1 job from here', 'offline (connection refused)'...: the state with why, and load."""
    text = str(worker.get("state") or "unknown")
    if worker.get("jobs_here"):
        text += f", {worker['jobs_here']} job(s) from here"
    if worker.get("error"):
        text += f" ({worker['error']})"
    return text


def worker_row(worker: dict[str, Any]) -> list[str]:
    """One row of the workers table (the order of WORKER_HEADERS), the URL flagged when the registry warns about
    it (plain http off this machine); never the token."""
    free = worker.get("free_disk_gb")
    return [
        str(worker["name"]),
        worker_state_text(worker),
        str(worker.get("gpu") or "?"),
        f"{free:.0f} GiB" if isinstance(free, (int, float)) else "",
        str(worker.get("url") or "")
        + (" ⚠️ plain http: the token is readable on the way" if worker.get("warning") else ""),
    ]


def _files(items: list[Any], limit: int = 6) -> str:
    """A short inline list of file names (or {"file": ...} entries)."""
    names = [str(i["file"] if isinstance(i, dict) else i) for i in items[:limit]]
    return ", ".join(f"`{n}`" for n in names) + (" …" if len(items) > limit else "")


def health_markdown(report: dict[str, Any]) -> str:
    """The dataset health report: problems first (duplicates, captions, sizes, extensions), then the numbers."""
    problems: list[str] = []
    dup = report["duplicates"]
    for group in dup["identical"]:
        problems.append(f"identical files: {_files(group)}")
    for group in dup["near"]:
        problems.append(f"near-duplicates (look alike): {_files(group)}")
    caps = report["captions"]
    if caps["missing"]:
        problems.append(f"{caps['missing']} image(s) without a caption file: {_files(caps['missing_files'])}")
    if caps["empty"]:
        problems.append(f"{caps['empty']} empty caption(s): {_files(caps['empty_files'])}")
    over = caps["over"]
    if over["75"]:
        problems.append(
            f"{over['75']} caption(s) longer than 75 tokens (cut unless max_token_length is 150 or 225; "
            f"{over['150']} over 150, {over['225']} over 225): {_files(caps['longest'])}"
        )
    sizes = report["sizes"]
    if sizes["tiny"]:
        problems.append(
            f"{sizes['tiny']} tiny image(s), below {sizes['tiny_below']}: {_files(sizes['tiny_files'])}"
        )
    if sizes["huge"]:
        problems.append(
            f"{sizes['huge']} huge image(s), above {sizes['huge_above']}: {_files(sizes['huge_files'])}"
        )
    aspects = report["aspect_ratios"]
    if aspects["extreme"]:
        problems.append(
            f"{aspects['extreme']} image(s) with an extreme aspect ratio (beyond 5:2): {_files(aspects['extreme_files'])}"
        )
    for item in report["mismatched_extensions"]:
        problems.append(f"`{item['file']}` is a {item['content']} file named {item['extension']}")
    for item in report["unreadable"]:
        problems.append(f"`{item['file']}` cannot be read: {item['reason']}")
    lines = [f"**Health of {report.get('name', 'the dataset')}** at {report['resolution']} px: "
             f"{report['images']} image(s), " + (f"{len(problems)} finding(s)" if problems else "no problems found")]  # fmt: skip
    lines += [f"- ⚠️ {p}" for p in problems]
    buckets = ", ".join(f"{b['width']}x{b['height']}: {b['images']}" for b in aspects["buckets"][:8])
    tags = report["tags"]
    lines += [
        "",
        f"Aspect ratios: {aspects['portrait']} portrait, {aspects['square']} square, {aspects['landscape']} "
        f"landscape. Buckets ({aspects['bucket_settings']}): {buckets or 'none'}",
        f"Captions: {caps['mean_tokens']} tokens on average, at most {caps['max_tokens']} "
        f"(counted with {caps['tokens_counted_with']})",
        f"Tags: {tags['distinct']} distinct; most common: "
        + (", ".join(f"{t['tag']} ({t['images']})" for t in tags["most_common"]) or "none")
        + (
            "; least common: " + ", ".join(f"{t['tag']} ({t['images']})" for t in tags["least_common"])
            if tags["least_common"]
            else ""
        ),
    ]
    return "\n".join(lines)


def no_models_markdown(folders: Iterable[str]) -> str:
    """Empty-home guidance for checkpoints: the exact folder(s) to put one in."""
    where = " or ".join(f"`{f}`" for f in folders)
    return (
        f"No checkpoint yet: put an SD 1.5 or SDXL `.safetensors` (or `.ckpt`) file in {where}, then press ↻ "
        "next to Model."
    )


def no_datasets_markdown(folder: str) -> str:
    """Empty-home guidance for datasets."""
    return (
        "No dataset yet: create one in the **Datasets** tab (upload captioned images or a zip), or put a folder "
        f"holding `<repeats>_<name>` subfolders into `{folder}`, then press ↻ next to Dataset."
    )
