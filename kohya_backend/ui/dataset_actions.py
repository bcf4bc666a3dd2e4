"""Callbacks of the Datasets area: create from uploads, browse with thumbnails, caption editor (with the host's
interrogator when it has one), validation report, delete an image or a dataset.

Creating a dataset and the full validation take minutes on big datasets, so they run as DatasetService tasks:
the click answers at once with a ticket, and the tab's poll shows the outcome when the task ends (finished()). The
health report runs the same way. On gradio 4 the page's tickets are kept per page on the server (PageSessions),
so the poll's finished() needs no inputs; on 3.41 they come from the page's State.

The caption editor always names the image the gallery shows selected: after a delete the editor moves to the
image that took the deleted one's place, and deletes of images and datasets are asked first."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gradio as gr

from kohya_backend.data.preprocess import Preprocess
from kohya_backend.errors import TrainManagementError
from kohya_backend.service.datasets import DatasetService, IncomingFile
from kohya_backend.service.tasks import Task
from kohya_backend.ui.choices import dropdown
from kohya_backend.ui.compat import GRADIO_MAJOR, session_of, uploaded_paths
from kohya_backend.ui.confirm import ask, dismissed
from kohya_backend.ui.hooks import UiHooks
from kohya_backend.ui.origin_guard import read_only
from kohya_backend.ui.present import created_markdown, error_markdown, health_markdown, report_markdown
from kohya_backend.ui.sessions import PageSessions
from kohya_backend.ui.thumbnails import ThumbnailCache, thumbnail

PREPROCESS_CHOICES: dict[str, str | None] = {
    "none": None,
    "512 x 512, center crop": "512-crop",
    "512, keep aspect ratio (bucket sizes)": "512-bucket",
    "1024 x 1024, center crop": "1024-crop",
    "1024, keep aspect ratio (bucket sizes)": "1024-bucket",
}
ZIP_HINT = "upload the folder as a zip instead: a zip keeps its `<repeats>_<name>` subfolders"
MAX_NAMES_SHOWN = 8
MAX_THUMBNAILS = 120
THUMBNAIL_PX = 192
PREVIEW_PX = 768
MAX_PENDING = 64  # uploads whose creation message is still to be shown
HEALTH_RESOLUTIONS = {"512 (SD 1.5)": 512, "1024 (SDXL)": 1024}
TICKETS = ("create", "validate", "health")


def repeated_names(files: list[tuple[str, Path]], folder: list[tuple[str, Path]]) -> list[str]:
    """File names that came more than once in an upload with a folder (zips aside): browsers send a folder's
    files without their subfolders, so a folder with `<repeats>_<name>` subfolders collides on names like 001.png.
    """
    if not folder:
        return []
    counts: dict[str, int] = {}
    for name, _ in files + folder:
        if not name.lower().endswith(".zip"):
            counts[name] = counts.get(name, 0) + 1
    return sorted(n for n, c in counts.items() if c > 1)


def flattening_markdown(repeated: list[str], target: str) -> str:
    """What a folder upload did with subfolders: a warning when names collided, else where its files went."""
    if not repeated:
        return (
            f"The folder's images and captions went into `{target}/` (a folder upload keeps no subfolders; "
            f"for a folder with `<repeats>_<name>` subfolders, {ZIP_HINT})."
        )
    shown = ", ".join(f"`{n}`" for n in repeated[:MAX_NAMES_SHOWN])
    more = f" and {len(repeated) - MAX_NAMES_SHOWN} more" if len(repeated) > MAX_NAMES_SHOWN else ""
    return (
        f"⚠️ **{len(repeated)} file name(s) came more than once** ({shown}{more}), so only the first of each "
        "was kept: the folder probably held several `<repeats>_<name>` subfolders. A folder upload sends file "
        f"names without their folders, so its files went into `{target}/`. To keep the subfolders and their "
        f"repeats, {ZIP_HINT}."
    )


def _label(caption: str | None) -> str:
    """A thumbnail's label: the first line of its caption, shortened."""
    first = (caption or "").strip().splitlines()[:1]
    return (first[0] if first else "(no caption)")[:80]


class DatasetActions:
    """The Datasets area's callbacks, bound to one DatasetService and the host's hooks."""

    def __init__(self, datasets: DatasetService, hooks: UiHooks) -> None:
        self.datasets = datasets
        self.hooks = hooks
        # Shared by every browser tab: an image is decoded again only when its file changes.
        self.thumbnails = ThumbnailCache(THUMBNAIL_PX, max_entries=MAX_THUMBNAILS + MAX_THUMBNAILS // 3)
        # What a creation's final message needs from its upload: repeated names, whether a folder came.
        self._uploads: OrderedDict[str, tuple[list[str], bool]] = OrderedDict()
        self._lock = threading.Lock()
        self.sessions = PageSessions()

    @read_only
    def choices(self, current: str | None = None) -> Any:
        """Dataset dropdown choices (folder names, none scanned), keeping the current one when it still exists."""
        return dropdown(self.datasets.home.dataset_names(), current)

    def create(
        self,
        request: gr.Request,
        name: str,
        subject: str,
        repeats: Any,
        files: Any,
        folder: Any,
        preprocess: str,
    ) -> tuple[str, str]:
        """Start creating a dataset from the uploaded files and folder (copied out of gradio's temporary files
        before this returns; the checks and preprocessing run in the background); (message, ticket)."""
        plain, from_folder = uploaded_paths(files), uploaded_paths(folder)
        incoming = [IncomingFile(n, p) for n, p in plain + from_folder]
        repeated = repeated_names(plain, from_folder)
        try:
            label = PREPROCESS_CHOICES.get(preprocess or "none", preprocess)
            options = Preprocess.parse(label)
            ticket = self.datasets.start_create(
                name, incoming, repeats=repeats, subject=subject or None, preprocess=options
            )
        except TrainManagementError as exc:
            return self._not_created(exc, repeated), ""
        with self._lock:
            self._uploads[ticket] = (repeated, bool(from_folder))
            while len(self._uploads) > MAX_PENDING:
                self._uploads.popitem(last=False)
        self.sessions.put(session_of(request), create=ticket)
        work = "checking and preprocessing" if options else "checking"
        return f"⏳ Creating dataset **{name.strip()}**: {work} {len(incoming)} file(s)…", ticket

    @staticmethod
    def _not_created(exc: TrainManagementError, repeated: list[str]) -> str:
        message = "❌ **The dataset was not created.**\n\n" + error_markdown(exc)
        if repeated:
            message += "\n\n" + flattening_markdown(repeated, "one folder")
        return message

    def tasks_mark(self) -> str:
        """What the tab's poll reads: changes whenever a dataset task of this service ends."""
        return str(self.datasets.tasks.finished)

    @read_only
    def finished(
        self,
        request: gr.Request,
        create_ticket: str = "",
        validate_ticket: str = "",
        health_ticket: str = "",
    ) -> tuple[Any, ...]:
        """The outcome of this page's dataset creation, validation and health report once they end: (creation
        message, browse dropdown, the training form's dataset choices, health report, the three tickets, then
        the opened dataset: open()'s outputs). A ticket is emptied once its outcome is shown."""
        session = session_of(request)
        tickets = {
            "create": self.sessions.value(session, "create", create_ticket) or "",
            "validate": self.sessions.value(session, "validate", validate_ticket) or "",
            "health": self.sessions.value(session, "health", health_ticket) or "",
        }
        message, browse, train = gr.update(), gr.update(), gr.update()
        opened: tuple[Any, ...] = (gr.update(),) * len(OPENED)
        created = self._task(tickets["create"])
        if created is not None:
            with self._lock:
                repeated, from_folder = self._uploads.pop(created.ticket, ([], False))
            if created.error is not None:
                message = self._not_created(created.error, repeated)
            else:
                message = "✅ " + created_markdown(created.result)
                if from_folder:
                    message += "\n\n" + flattening_markdown(repeated, created.result["subset_folder"])
                browse = self.choices(created.result["name"])
                train = self.choices(created.result["name"])  # the training form offers the new dataset
                opened = self.open(created.result["name"])
            tickets["create"] = ""
        checked = self._task(tickets["validate"])
        if checked is not None:
            error = checked.error
            report = error_markdown(error) if error is not None else report_markdown(checked.result)
            opened = (
                f"Validated at {time.strftime('%H:%M:%S')} (every image decoded):\n\n{report}",
                *opened[1:],
            )
            tickets["validate"] = ""
        health: Any = gr.update()
        measured = self._task(tickets["health"])
        if measured is not None:
            error = measured.error
            health = error_markdown(error) if error is not None else health_markdown(measured.result)
            tickets["health"] = ""
        self.sessions.put(session, **tickets)
        return (
            message,
            browse,
            train,
            health,
            tickets["create"],
            tickets["validate"],
            tickets["health"],
            *opened,
        )

    def _task(self, ticket: str | None) -> Task | None:
        """The ended task of `ticket` (None while it runs, or without a ticket)."""
        if not ticket:
            return None
        try:
            task = self.datasets.task(ticket)
        except TrainManagementError as exc:  # forgotten (a host restart): say so once
            return Task(str(ticket), "unknown", state="failed", error=exc)
        return None if task.state == "running" else task

    def import_hint(self) -> str:
        """The Datasets area's note on folders: a zip keeps its subfolders (the web way to bring a folder)."""
        return (
            "To bring a folder of `<repeats>_<name>` subfolders (e.g. one made for kohya's tools), zip it and "
            "upload the zip: a zip keeps its subfolders and their repeats; a folder upload sends only file names "
            "(they all go into one `<repeats>_<subject>` folder)."
        )

    @read_only
    def open(self, name: str | None, select: int | None = None) -> tuple[Any, ...]:
        """(report, thumbnails, image choices, names and labels of the thumbnails, preview, caption, message) of a
        dataset; with `select`, the editor shows the image at that place (the gallery marks it on gradio 4),
        else no image."""
        empty = (None, "", "")
        if not name:
            return ("No dataset chosen.", [], dropdown([], None), [], [], *empty)
        try:
            shown = self.datasets.show(name)
        except TrainManagementError as exc:
            return (error_markdown(exc), [], dropdown([], None), [], [], *empty)
        folder = Path(shown["folder"])
        images = [i["image"] for i in shown["images"]]
        thumbnails, names, labels = [], [], []
        for item in shown["images"][:MAX_THUMBNAILS]:
            picture = self.thumbnails.get(folder / item["image"])
            if picture is None:  # unreadable: the report names it
                continue
            thumbnails.append((picture, _label(item["caption"])))
            names.append(item["image"])
            labels.append(_label(item["caption"]))
        report = report_markdown(shown["report"])
        if len(images) > MAX_THUMBNAILS:
            report += f"\n\nShowing the first {MAX_THUMBNAILS} of {len(images)} images; pick others in Image."
        chosen = names[min(select, len(names) - 1)] if select is not None and names else None
        gallery: Any = thumbnails
        if GRADIO_MAJOR >= 4:  # 3.41 keeps the marked place itself; 4.x is told which
            gallery = gr.update(value=thumbnails, selected_index=names.index(chosen) if chosen else None)
        editor = self.select_image(name, chosen) if chosen else empty
        return (report, gallery, gr.update(choices=images, value=chosen), names, labels, *editor)

    def validate(self, request: gr.Request, name: str | None) -> tuple[str, str]:
        """Start the trainer's full validation (every image decoded, in the background); (message, ticket)."""
        if not name:
            return "No dataset chosen.", ""
        try:
            ticket = self.datasets.start_validate(name)
        except TrainManagementError as exc:
            return error_markdown(exc), ""
        self.sessions.put(session_of(request), validate=ticket)
        return (
            f"⏳ Validating **{name}** (started {time.strftime('%H:%M:%S')}): decoding every image…",
            ticket,
        )

    def health(self, request: gr.Request, name: str | None, resolution: str) -> tuple[str, str]:
        """Start the dataset health report (in the background); (message, ticket)."""
        if not name:
            return "No dataset chosen.", ""
        try:
            ticket = self.datasets.start_health(name, resolution=HEALTH_RESOLUTIONS.get(resolution, 512))
        except TrainManagementError as exc:
            return error_markdown(exc), ""
        self.sessions.put(session_of(request), health=ticket)
        return f"⏳ Checking the health of **{name}**: hashing every image…", ticket

    @read_only
    def pick_thumbnail(self, name: str | None, names: list[str], evt: gr.SelectData) -> tuple[Any, ...]:
        """A click on a thumbnail opens that image in the caption editor: (image choice, preview, caption,
        message)."""
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            image = names[int(index)]
        except (IndexError, TypeError, ValueError):
            return gr.update(), gr.update(), gr.update(), gr.update()
        return (gr.update(value=image), *self.select_image(name, image))

    @read_only
    def select_image(self, name: str | None, image: str | None) -> tuple[Any, str, str]:
        """(preview, caption text, message) of one image."""
        if not name or not image:
            return None, "", ""
        try:
            path = self.datasets.image_path(name, image)
            return thumbnail(path, PREVIEW_PX), self.datasets.read_caption(name, image), ""
        except TrainManagementError as exc:
            return None, "", error_markdown(exc)

    def save_caption(
        self, name: str | None, image: str | None, text: str, names: list[str], labels: list[str]
    ) -> tuple[str, Any, list[str]]:
        """Write the caption file of the selected image; (message, gallery with that label changed, labels)."""
        if not name or not image:
            return "Choose a dataset and an image first.", gr.update(), labels
        try:
            saved = self.datasets.write_caption(name, image, text or "")
        except TrainManagementError as exc:
            return "❌ " + error_markdown(exc), gr.update(), labels
        message = f"Saved the caption of `{saved['image']}`."
        if image not in (names or []) or len(labels or []) != len(names):
            return message, gr.update(), labels
        labels = [*labels]
        labels[names.index(image)] = _label(saved["caption"])
        folder = self.datasets.folder(name)
        pictures = [self.thumbnails.get(folder / shown) for shown in names]  # cached: nothing decoded again
        if any(picture is None for picture in pictures):  # an image went away meanwhile: Refresh shows it
            return message, gr.update(), labels
        return message, list(zip(pictures, labels)), labels

    def generate_caption(self, name: str | None, image: str | None) -> tuple[Any, str]:
        """Caption the selected image with the host's interrogator (the editor is filled, not saved)."""
        if self.hooks.interrogate is None:
            return gr.update(), "This host offers no captioner."
        if not name or not image:
            return gr.update(), "Choose a dataset and an image first."
        try:
            caption = self.hooks.interrogate(self.datasets.image_path(name, image))
        except TrainManagementError as exc:
            return gr.update(), "❌ " + error_markdown(exc)
        except (
            Exception
        ) as exc:  # the host's captioner is foreign code: report its failure, keep the tab alive
            return gr.update(), f"❌ The captioner failed: {exc}"
        return gr.update(value=caption), "Generated a caption: check it, then press Save caption."

    @read_only
    def ask_delete_image(self, name: str | None, image: str | None, names: list[str]) -> tuple[Any, ...]:
        """Ask before deleting the image the editor shows: (row, question, pending, message)."""
        if not name or not image:
            return (*dismissed(), "Choose a dataset and an image first.")
        index = names.index(image) if image in (names or []) else None
        question = f"Delete `{image}` and its caption from **{name}**?"
        return (*ask(question, {"dataset": name, "image": image, "index": index}), "")

    def delete_image(self, pending: dict[str, Any] | None) -> tuple[Any, ...]:
        """Delete the image named when it was asked; (row, question, pending, then open()'s outputs with the
        editor on the image that took its place)."""
        if not pending:
            return (*dismissed(), *(gr.update(),) * len(OPENED))
        name, image = pending["dataset"], pending["image"]
        try:
            self.datasets.delete_image(name, image)
        except TrainManagementError as exc:
            return (*dismissed(), *(gr.update(),) * (len(OPENED) - 1), "❌ " + error_markdown(exc))
        opened = self.open(name, select=pending.get("index"))
        note = f"Deleted `{image}`." + (f" Now showing `{opened[2]['value']}`." if opened[2]["value"] else "")
        return (*dismissed(), *opened[:-1], note)

    @read_only
    def ask_delete_dataset(self, name: str | None) -> tuple[Any, ...]:
        """Ask before deleting the chosen dataset: (row, question, pending, message)."""
        if not name:
            return (*dismissed(), "No dataset chosen.")
        return (*ask(f"Delete dataset **{name}** and all its files? This cannot be undone.", name), "")

    def delete_dataset(self, name: str | None) -> tuple[Any, ...]:
        """Delete the dataset named when it was asked: (row, question, pending, message, browse choices, the
        training form's dataset choices)."""
        if not name:
            return (*dismissed(), "", gr.update(), gr.update())
        try:
            self.datasets.delete(name)
        except TrainManagementError as exc:
            return (*dismissed(), "❌ " + error_markdown(exc), gr.update(), gr.update())
        remaining = self.datasets.home.dataset_names()
        return (
            *dismissed(),
            f"Deleted dataset **{name}**.",
            self.choices(None),
            gr.update(choices=remaining),
        )


# open()'s outputs, in order (finished() and delete_image() end with them)
OPENED = ("report", "gallery", "image", "names", "labels", "preview", "caption", "message")
