"""`python -m kohya_backend ...`: check configs, train, and run the bundled demo.

Heavy libraries (torch, diffusers) are imported inside the commands that need them, so `config format` and
`--help` stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kohya_backend.cli_s3 import add_s3_parser
from kohya_backend.cli_sagemaker import add_sagemaker_parsers
from kohya_backend.cli_workers import add_worker_parsers
from kohya_backend.errors import ConfigError, TrainManagementError
from kohya_backend.families import FM_TYPES
from kohya_backend.job_folder import JobFolder, ResultRecord, output_stem
from kohya_backend.service.home import DEFAULT_HOME

CONSOLE_SCRIPT = "train-management"  # pyproject.toml's [project.scripts] name for main()


def _read_source(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TrainManagementError(f"cannot read config file {path}: {exc.strerror}") from exc


def _cmd_config_format(args: argparse.Namespace) -> int:
    source = _read_source(args.file)
    from kohya_backend.train.plan import format_with_plan

    try:
        out = format_with_plan(
            source,
            args.fm_type,
            require_paths=not args.no_paths,
            check_paths_exist=not args.no_paths,
            check_optimizer=True,
        )
    except ConfigError as exc:
        if args.json:
            print(json.dumps({"ok": False, "issues": [i.to_dict() for i in exc.issues]}, indent=2))
        else:
            print(str(exc), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"ok": out["dataset_error"] is None, **out}, indent=2))
        return 0 if out["dataset_error"] is None else 2
    print(out["toml"], end="")
    for warning in out["warnings"]:
        print(f"warning: {warning['key'] or ''} {warning['message']}", file=sys.stderr)
    if out.get("plan_text"):
        print("\n# plan\n" + "\n".join(f"# {line}" for line in out["plan_text"].splitlines()))
    if out["dataset_error"]:
        print(f"dataset: {out['dataset_error']['message']}", file=sys.stderr)
        return 2
    return 0


def _cmd_config_template(args: argparse.Namespace) -> int:
    from kohya_backend.config.schema import template_toml

    print(template_toml(args.fm_type), end="")
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from kohya_backend.config.format import reference_markdown

    print(reference_markdown(), end="")
    return 0


def _install_stop_handler(*, repeat_forces: bool = True) -> threading.Event:
    """SIGTERM/SIGINT (and SIGBREAK, Windows' graceful stop) ask the loop to stop at the next step (saving state
    when save_state is on). A second one stops at once, unless this is one of several training processes: their
    launcher passes the stop on to each (which may have had it already) and kills them if asked again."""
    from kohya_backend.jobs.processes import stop_signals

    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set() and repeat_forces:  # a second signal: stop now
            raise KeyboardInterrupt
        stop.set()

    for signum in stop_signals():
        signal.signal(signum, handler)
    return stop


def _write_result(job_dir: Path, result: ResultRecord) -> None:
    """DIR/result.json, written atomically, tells the job runner how the trainer ended."""
    from kohya_backend.fileio import write_json_atomic

    write_json_atomic(JobFolder(job_dir).result, result)


def run_training(
    config_source: str,
    fm_type: str | None,
    *,
    events_path: Path | None,
    job_dir: Path | None = None,
    resume: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Validate, then train; prints progress and returns a process exit code (0 done, 2 user error, 3 stopped).

    With `job_dir`, outputs go to DIR/output, events to DIR/events.jsonl and the outcome to DIR/result.json.
    `on_event(event)` also sees every event (the SageMaker container prints them to its log).
    """
    from kohya_backend.config.parse import parse_config
    from kohya_backend.config.validate import validate_config
    from kohya_backend.launcher import watch_parent
    from kohya_backend.train.events import EventLog
    from kohya_backend.train.loop import train
    from kohya_backend.train.process_env import process_info

    processes = process_info()  # one of several data-parallel processes? (RANK, WORLD_SIZE from its launcher)
    main = processes.is_main
    # Rank 0 reports (events, console, result.json); the others only print their own errors (main() does).
    events = EventLog(events_path if main else None, console=sys.stderr if main else None)
    if on_event is not None and main:
        events.subscribe(on_event)
    if processes.distributed:
        watch_parent()
    outcome: ResultRecord = {"status": "failed", "output": None, "step": 0, "epoch": 0, "error": None}
    try:
        parsed = parse_config(config_source)
        if job_dir is not None:
            folder = JobFolder(job_dir)
            parsed.values["output_dir"] = str(folder.output)
            if resume:
                from kohya_backend.train.state import latest_state

                name = parsed.values.get("output_name")
                state = latest_state(folder.state_dir(output_stem(str(name) if name else None)))
                if state is None and parsed.values.get("resume"):
                    events.emit(
                        "warning",
                        message="this job has saved no state of its own yet: it starts from the config's resume, "
                        f"{parsed.values['resume']}",
                    )
                elif state is None:
                    events.emit(
                        "warning", message="no saved state to resume from: training starts from step 0"
                    )
                else:
                    parsed.values["resume"] = str(state)
        if fm_type is None:
            fm_type = _detect_fm_type(parsed.values.get("pretrained_model_name_or_path"))
        config = validate_config(parsed, fm_type)
        for warning in config.warnings:
            events.emit("warning", message=warning.render())
        stop = _install_stop_handler(repeat_forces=not processes.distributed)
        result = train(
            config, events=events, stop=stop, state_each_epoch=job_dir is not None, processes=processes
        )
    except TrainManagementError as exc:
        events.emit("error", message=exc.message, hint=exc.hint)
        outcome["error"] = {"message": str(exc), "hint": exc.hint}
        if job_dir is not None and main:
            _write_result(job_dir, outcome)
        raise
    outcome = {
        "status": "stopped" if result.stopped else "completed",
        "output": str(result.output) if result.output else None,
        "step": result.step,
        "epoch": result.epoch,
        "error": None,
    }
    if not main:
        return 3 if result.stopped else 0
    if job_dir is not None:
        _write_result(job_dir, outcome)
    if result.stopped:
        print(f"stopped at step {result.step}", file=sys.stderr)
        return 3
    print(f"LoRA written: {result.output}")
    return 0


def _detect_fm_type(model: object) -> str:
    """The FM type of a checkpoint, from its keys alone (for `train` without --fm-type)."""
    from kohya_backend.models.detect import detect_family
    from kohya_backend.models.diffusers_folder import (
        detect_folder_family,
        is_diffusers_folder,
        resolve_model_path,
    )
    from kohya_backend.models.keys import read_keys

    if not model:
        raise TrainManagementError("pretrained_model_name_or_path is missing", hint="set it in the config")
    path = resolve_model_path(str(model))
    family = detect_folder_family(path) if is_diffusers_folder(path) else str(detect_family(read_keys(path)))
    if family not in FM_TYPES:
        raise TrainManagementError(
            f"{model} is a {family} checkpoint; this trainer trains sd_1_5 and sd_xl models"
        )
    return family


def _lean_process(optimizer_type: str) -> None:
    """Before diffusers is imported: no bitsandbytes unless the optimizer is 8-bit, no irrelevant warnings."""
    from kohya_backend.train.runtime import hide_bitsandbytes_unless_needed, quiet_library_noise

    quiet_library_noise()
    hide_bitsandbytes_unless_needed(optimizer_type)


def _trainer_process(optimizer_type: str) -> None:
    """This process trains: keep glibc's allocator from re-faulting each step's activations, and stay lean."""
    from kohya_backend.train.runtime import tune_allocator

    tune_allocator()
    _lean_process(optimizer_type)


def _optimizer_of(source: str) -> str:
    """The config's optimizer_type ('' when the config does not parse: run_training reports why)."""
    from kohya_backend.config.parse import parse_config

    try:
        return str(parse_config(source).values.get("optimizer_type") or "AdamW")
    except ConfigError:
        return ""


def _launch_processes(args: argparse.Namespace) -> int:
    """`train --num-processes N`: this same command in N data-parallel processes (s3:// inputs fetched once, here,
    and the LoRA uploaded once, after)."""
    import tempfile

    from kohya_backend.launcher import launch
    from kohya_backend.train.process_env import process_info

    if process_info().distributed:
        raise TrainManagementError(
            "this process is already one of several training processes (WORLD_SIZE is set by its launcher)",
            "use either --num-processes or accelerate launch / torchrun, not both",
        )
    common = ["--fm-type", args.fm_type] if args.fm_type else []
    if args.job:
        resume = ["--resume"] if args.resume else []
        return launch(["train", "--job", args.job, *resume, *common], args.num_processes)
    if not args.config:
        raise TrainManagementError("train needs --config FILE (or --job DIR)")
    from kohya_backend.cli_s3 import stage_config, upload_results

    source, s3_output, local_out = stage_config(_read_source(args.config))
    events = ["--events", args.events] if args.events else []
    with tempfile.TemporaryDirectory(prefix="train-management-") as folder:
        staged = Path(folder) / "config"  # what every process reads: stdin is read once, S3 fetched once
        staged.write_text(source, encoding="utf-8")
        code = launch(["train", "--config", str(staged), *events, *common], args.num_processes)
    if code == 0 and s3_output is not None and local_out is not None:
        upload_results(local_out, s3_output)
    return code


def _cmd_train(args: argparse.Namespace) -> int:
    if args.num_processes > 1:
        return _launch_processes(args)
    if args.job:
        folder = JobFolder(Path(args.job).resolve())
        source = _read_source(str(folder.config))
        _trainer_process(_optimizer_of(source))
        return run_training(
            source, args.fm_type, events_path=folder.events, job_dir=folder.root, resume=args.resume
        )
    if not args.config:
        raise TrainManagementError("train needs --config FILE (or --job DIR)")
    from kohya_backend.cli_s3 import stage_config, upload_results

    source, s3_output, local_out = stage_config(_read_source(args.config))  # s3:// inputs fetched first
    _trainer_process(_optimizer_of(source))
    events = Path(args.events) if args.events else None
    code = run_training(source, args.fm_type, events_path=events)
    if code == 0 and s3_output is not None and local_out is not None:
        upload_results(local_out, s3_output)
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    from kohya_backend.assets.demo import prepare_demo

    home = Path(args.home).resolve()
    _trainer_process("AdamW")  # the demo trains with AdamW, in this process
    config_path = prepare_demo(home, fm_type=args.fm_type, steps=args.steps)
    print(f"demo model, dataset and config under {home}")
    events = home / "demo-events.jsonl"
    return run_training(config_path.read_text(encoding="utf-8"), args.fm_type, events_path=events)


def _jobs_service(args: argparse.Namespace) -> Any:
    from kohya_backend.service.app import build_service

    return build_service(Path(args.home), poll_interval_s=0.5, restrict_paths=False)


def _print_job_line(job: dict[str, Any]) -> None:
    progress = job.get("progress") or {}
    step = f"{progress.get('step') or 0}/{progress.get('total_steps') or '?'}"
    print(
        f"{job['id']}  {job['status']:<11} {step:>9}  {job['output_name']}  ({job['model']}, {job['dataset']})"
    )


def _process_count(text: str) -> int:
    """An argparse type: a number of processes, 1 or more."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes (1 or more)")
    return int(text)


def _positive_minutes(text: str) -> float:
    """An argparse type: a number of minutes above 0."""
    try:
        minutes = float(text)
    except ValueError:
        minutes = 0.0
    if not minutes > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes above 0")
    return minutes


def _cmd_serve(args: argparse.Namespace) -> int:
    from kohya_backend.ui.standalone import serve, serve_policy

    _lean_process("")  # the server never trains itself; its demo writer needs no bitsandbytes
    policy = serve_policy(
        args.host,
        allowed_hosts=tuple(args.allowed_hosts or ()),
        cors_allow_origins=tuple(args.cors_allow_origins or ()),
        cors_allow_origins_regex=args.cors_allow_origins_regex,
    )
    serve(
        Path(args.home),
        host=args.host,
        port=args.port,
        token=args.token,
        demo=args.demo,
        policy=policy,
        stall_after_s=args.stall_minutes * 60,
        s3_uri=args.s3_uri,
        sagemaker_role_arn=args.sagemaker_role_arn,
        sagemaker_image_uri=args.sagemaker_image_uri,
        forwarded_allow_ips=args.forwarded_allow_ips,
    )
    return 0


def _cmd_jobs_submit(args: argparse.Namespace) -> int:
    from kohya_backend.service.training import Submission

    service = _jobs_service(args)
    source = _read_source(args.config) if args.config else ""
    job = service.submit(
        Submission(
            args.model, args.dataset, args.fm_type, source, instance_type=args.instance_type, gpus=args.gpus
        )
    )
    print(job.id)
    print(f"queued; `jobs run --home {args.home}` (or a running `serve`) trains it", file=sys.stderr)
    return 0


def _cmd_jobs_list(args: argparse.Namespace) -> int:
    page = _jobs_service(args).list(status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    for job in page["jobs"]:
        _print_job_line(job)
    print(f"{page['total']} job(s)", file=sys.stderr)
    return 0


def _cmd_jobs_show(args: argparse.Namespace) -> int:
    print(json.dumps(_jobs_service(args).show(args.id), indent=2))
    return 0


def _cmd_jobs_logs(args: argparse.Namespace) -> int:
    import time

    service = _jobs_service(args)
    path = service.log_path(args.id)
    position = 0
    while True:
        settled = service.is_settled(args.id)
        if path.exists():
            with open(path, "rb") as handle:
                handle.seek(position)
                chunk = handle.read()
            position += len(chunk)
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
        if not args.follow or settled:
            return 0
        time.sleep(0.5)


def _cmd_jobs_action(args: argparse.Namespace) -> int:
    service = _jobs_service(args)
    if args.jobs_command == "delete":
        note = service.delete(args.id, wait_remote=True)
        print(f"deleted {args.id}" + (f"; {note}" if note else ""))
        return 0
    job = service.cancel(args.id) if args.jobs_command == "cancel" else service.resume(args.id)
    _print_job_line(job)
    return 0


def _cmd_jobs_run(args: argparse.Namespace) -> int:
    """Run the scheduler in the foreground until no job is queued or running."""
    import time

    from kohya_backend.jobs.states import JobStatus

    service = _jobs_service(args)
    scheduler, store = service.scheduler, service.store
    busy = JobStatus.busy()
    seen: dict[str, str] = {}
    try:
        while True:
            scheduler.tick()
            jobs, _ = store.list(limit=1000)
            for job in jobs:
                if (job.id in seen or job.status in busy) and seen.get(job.id) != job.status.value:
                    print(f"{job.id}  {job.status.value}: {job.reason}", flush=True)
                    seen[job.id] = job.status.value
            if store.list(status=busy, limit=1)[1] == 0:
                return 0
            time.sleep(scheduler.poll_interval_s)
    finally:
        scheduler.stop()


def _add_jobs_parser(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="submit and manage training jobs in a home folder").add_subparsers(
        dest="jobs_command", required=True
    )

    def command(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = jobs.add_parser(name, help=help_text)
        parser.add_argument("--home", default=DEFAULT_HOME, help="the Train Management home folder")
        parser.set_defaults(func=func)
        return parser

    submit = command("submit", "validate and queue a job", _cmd_jobs_submit)
    submit.add_argument(
        "--model", required=True, help="checkpoint name under HOME/models, or s3://bucket/key"
    )
    submit.add_argument(
        "--dataset", required=True, help="dataset folder name under HOME/datasets, or s3://bucket/prefix"
    )
    submit.add_argument("--fm-type", choices=FM_TYPES, required=True)
    submit.add_argument("--config", help="config_params file (TOML or JSON), or - for standard input")
    submit.add_argument(
        "--instance-type",
        default="local",
        help="where to train: local (default), worker (any free remote worker), worker:NAME (`workers list`) or "
        "sagemaker:TYPE[:spot] (`sagemaker instance-types`)",
    )
    submit.add_argument(
        "--gpus",
        type=_process_count,
        default=1,
        metavar="N",
        help="GPUs per job: train data-parallel on N GPUs of the instance (one process each; train_batch_size is "
        "per GPU); on a machine without CUDA GPUs, N CPU processes",
    )
    listing = command("list", "list jobs, newest first", _cmd_jobs_list)
    listing.add_argument("--status", action="append", help="only jobs in this state (repeatable)")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    command("show", "print a job in full (JSON)", _cmd_jobs_show).add_argument("id")
    logs = command("logs", "print a job's train.log", _cmd_jobs_logs)
    logs.add_argument("id")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    for name, text in (("cancel", "cancel a job"), ("resume", "queue a stopped job again"),
                       ("delete", "delete a finished job and its folder")):  # fmt: skip
        command(name, text, _cmd_jobs_action).add_argument("id")
    command("run", "train queued jobs in the foreground until none is left", _cmd_jobs_run)


def _datasets_service(args: argparse.Namespace) -> Any:
    from kohya_backend.jobs.store import JobStore
    from kohya_backend.service.datasets import DatasetService
    from kohya_backend.service.home import Home

    home = Home(Path(args.home))
    return DatasetService(home, jobs=JobStore(home.root))


def _print_dataset_result(result: dict[str, Any]) -> None:
    print(f"dataset {result['name']}: {len(result['images'])} image(s) in {result['folder']}")
    for skipped in result["skipped"]:
        print(f"skipped {skipped['file']}: {skipped['reason']}", file=sys.stderr)
    _print_report(result["report"])


def _print_report(report: dict[str, Any]) -> None:
    if not report["ok"]:
        print(f"problem: {report['message']}\n  hint: {report['hint']}", file=sys.stderr)
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)


def _cmd_datasets(args: argparse.Namespace) -> int:
    """create | import | list | show | delete, all through DatasetService (the API and the tab use it too)."""
    from kohya_backend.data.preprocess import Preprocess
    from kohya_backend.service.datasets import IncomingFile

    service = _datasets_service(args)
    command = args.datasets_command
    if command in ("create", "import"):
        options = {
            "repeats": args.repeats,
            "subject": args.subject,
            "preprocess": Preprocess.parse(args.preprocess),
        }
        if command == "create":
            files = [IncomingFile(Path(f).name, Path(f)) for f in args.files]
            result = service.create(args.name, files, **options)
        else:
            result = service.import_folder(
                Path(args.path), args.name or Path(args.path).resolve().name, **options
            )
        _print_dataset_result(result)
        return 0 if result["report"]["ok"] else 2
    if command == "list":
        for entry in service.list():
            summary = entry["summary"]
            state = (
                f"{summary['images']} image(s), {summary['train_items']} with repeats"
                if summary
                else "problem"
            )
            print(f"{entry['name']}  {state}")
        return 0
    if command == "show":
        shown = service.show(args.name) if not args.verify else {"report": service.validate(args.name)}
        if args.json:
            print(json.dumps(shown, indent=2))
        else:
            for image in shown.get("images", []):
                print(f"{image['image']}  {image['caption'] or '(no caption)'}")
            _print_report(shown["report"])
        return 0 if shown["report"]["ok"] else 2
    if args.image:
        service.delete_image(args.name, args.image)
        print(f"deleted {args.image} from {args.name}")
    else:
        service.delete(args.name)
        print(f"deleted dataset {args.name}")
    return 0


def _add_datasets_parser(sub: Any) -> None:
    datasets = sub.add_parser("datasets", help="create, inspect and delete datasets in a home folder")
    commands = datasets.add_subparsers(dest="datasets_command", required=True)
    parsers = {
        "create": commands.add_parser("create", help="create a dataset from images, captions and zips"),
        "import": commands.add_parser(
            "import", help="copy a local folder in as a dataset (relative paths kept)"
        ),
        "list": commands.add_parser("list", help="list datasets with their image counts"),
        "show": commands.add_parser("show", help="images, captions and the validation report"),
        "delete": commands.add_parser("delete", help="delete a dataset (or one image of it with --image)"),
    }
    for name, parser in parsers.items():
        parser.add_argument("--home", default=DEFAULT_HOME, help="the Train Management home folder")
        parser.set_defaults(func=_cmd_datasets)
        if name in ("create", "import"):
            parser.add_argument(
                "--repeats", default="10", help="repeats of files not in a <repeats>_<name> folder"
            )
            parser.add_argument("--subject", help="class token of that folder (default: the dataset name)")
            parser.add_argument("--preprocess", help="512-crop, 512-bucket, 1024-crop or 1024-bucket")
    parsers["create"].add_argument("name", help="dataset folder name under HOME/datasets")
    parsers["create"].add_argument("files", nargs="+", help="image, caption and zip files")
    parsers["import"].add_argument("path", help="a local folder (any path on this machine)")
    parsers["import"].add_argument("--name", help="dataset name (default: the folder's name)")
    parsers["show"].add_argument("name")
    parsers["show"].add_argument("--json", action="store_true", help="machine-readable output")
    parsers["show"].add_argument("--verify", action="store_true", help="decode every image (full validation)")
    parsers["delete"].add_argument("name")
    parsers["delete"].add_argument("--image", help="delete only this image (relative to the dataset)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m kohya_backend`."""
    command = Path(sys.argv[0]).name
    prog = command if command == CONSOLE_SCRIPT else "python -m kohya_backend"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="check, format and document config_params").add_subparsers(
        dest="config_command", required=True
    )
    fmt = cfg.add_parser(
        "format", help="validate a config (TOML or JSON) and print the canonical TOML and plan"
    )
    fmt.add_argument("file", help="config file, or - for standard input")
    fmt.add_argument("--fm-type", choices=FM_TYPES, required=True)
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument(
        "--no-paths",
        action="store_true",
        help="do not require model/dataset/output paths, nor check that the paths given exist",
    )
    fmt.set_defaults(func=_cmd_config_format)
    tpl = cfg.add_parser("template", help="print the starting config for an FM type")
    tpl.add_argument("--fm-type", choices=FM_TYPES, required=True)
    tpl.set_defaults(func=_cmd_config_template)
    ref = cfg.add_parser("reference", help="print the config reference (Markdown)")
    ref.set_defaults(func=_cmd_config_reference)

    tr = sub.add_parser("train", help="train a LoRA from a kohya-style config")
    tr.add_argument("--config", help="config file (TOML or JSON), or - for standard input")
    tr.add_argument(
        "--job", help="a job folder (config.toml inside; outputs, events and result.json written there)"
    )
    tr.add_argument("--resume", action="store_true", help="with --job: continue from the newest saved state")
    tr.add_argument("--fm-type", choices=FM_TYPES, help="default: detected from the checkpoint")
    tr.add_argument("--events", help="also write progress events (JSON lines) to this file")
    tr.add_argument(
        "--num-processes",
        type=_process_count,
        default=1,
        metavar="N",
        help="train data-parallel in N processes, one per GPU (CUDA_VISIBLE_DEVICES picks them; on a CPU-only "
        "machine N CPU processes); train_batch_size is per process, as with accelerate launch --num_processes N",
    )
    tr.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="generate a tiny model and dataset and train on them end to end")
    demo.add_argument("--home", default="demo_home", help="folder for the demo's model, dataset and output")
    demo.add_argument("--fm-type", choices=FM_TYPES, default=FM_TYPES[0])
    demo.add_argument("--steps", type=int, default=40)
    demo.set_defaults(func=_cmd_demo)

    srv = sub.add_parser("serve", help="serve the tab at / and the REST API, with the scheduler that trains")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=7861)
    srv.add_argument("--home", default=DEFAULT_HOME, help="the Train Management home folder")
    srv.add_argument(
        "--token", help="require 'Authorization: Bearer TOKEN' (default: $TRAIN_MANAGEMENT_TOKEN)"
    )
    srv.add_argument("--demo", action="store_true", help="add a tiny demo model and dataset to an empty home")
    srv.add_argument(
        "--s3-uri",
        help="s3://bucket/prefix whose models/ and datasets/ join the lists (default: HOME/cloud.toml)",
    )
    srv.add_argument(
        "--sagemaker-role-arn",
        help="the IAM role SageMaker training jobs run with (default: HOME/cloud.toml [sagemaker] role_arn)",
    )
    srv.add_argument(
        "--sagemaker-image-uri",
        help="the training image in ECR (docker/sagemaker/Dockerfile; default: HOME/cloud.toml [sagemaker] image_uri)",
    )
    srv.add_argument(
        "--allowed-hosts",
        action="append",
        metavar="NAMES",
        help="more host names the server answers to (comma-separated; e.g. a reverse proxy's; '*' for any)",
    )
    srv.add_argument(
        "--cors-allow-origins",
        action="append",
        metavar="ORIGINS",
        help="other websites (scheme://host[:port], comma-separated) allowed to use the API from a browser",
    )
    srv.add_argument(
        "--cors-allow-origins-regex", metavar="REGEX", help="allowed other websites as a regular expression"
    )
    srv.add_argument(
        "--forwarded-allow-ips",
        metavar="IPS",
        help="reverse proxies (comma-separated addresses) whose X-Forwarded-For names the client; default none: "
        "every client is the address it connects from",
    )
    srv.add_argument(
        "--stall-minutes",
        type=_positive_minutes,
        default=15.0,
        metavar="N",
        help="show a training as stalled after N minutes without progress (loading and caching aside; default 15)",
    )
    srv.set_defaults(func=_cmd_serve)
    _add_jobs_parser(sub)
    _add_datasets_parser(sub)
    add_worker_parsers(sub)
    add_s3_parser(sub)
    add_sagemaker_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code (2 for errors a user can fix, with the reason on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TrainManagementError as exc:
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
        who = f"[training process {rank}] " if rank != "0" else ""  # one of several data-parallel processes
        print(f"{who}error: {exc}", file=sys.stderr)
        return 2
