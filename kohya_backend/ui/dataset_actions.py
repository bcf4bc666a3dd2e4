"""Callbacks of the Datasets area: create from uploads, browse with thumbnails, caption editor (with the host's
interrogator when it has one), validation report, delete an image or a dataset.

Creating a dataset and the full validation take minutes on big datasets, so they run as DatasetService tasks:
the click answers at once with a ticket, and the tab's poll shows the outcome when the task ends (finished())."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gradio as gr

from kohya_backend.data.preprocess import Preprocess
from kohya_backend.errors import TrainManagementError
from kohya_backend.service.datasets import DatasetService, IncomingFile
from kohya_backend.service.tasks import Task
from kohya_backend.ui.choices import dropdown
from kohya_backend.ui.compat import uploaded_paths
from kohya_backend.ui.hooks import UiHooks
from kohya_backend.ui.present import created_markdown, error_markdown, report_markdown
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

    def choices(self, current: str | None = None) -> Any:
        """Dataset dropdown choices (folder names, none scanned), keeping the current one when it still exists."""
        return dropdown(self.datasets.home.dataset_names(), current)

    def create(
        self, name: str, subject: str, repeats: Any, files: Any, folder: Any, preprocess: str
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

    def finished(self, create_ticket: str, validate_ticket: str) -> tuple[Any, Any, str, Any, str]:
        """The outcome of this page's dataset creation and validation once they end: (creation message, browse
        dropdown, creation ticket, report, validation ticket); a ticket is emptied once its outcome is shown."""
        created = self._task(create_ticket)
        message, browse = gr.update(), gr.update()
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
            create_ticket = ""
        checked = self._task(validate_ticket)
        report = gr.update()
        if checked is not None:
            error = checked.error
            report = error_markdown(error) if error is not None else report_markdown(checked.result)
            validate_ticket = ""
        return message, browse, create_ticket, report, validate_ticket

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
        """The Datasets area's note on folders already on the server (a CLI command, kept out of the tab)."""
        return (
            "A zip keeps its `<repeats>_<name>` subfolders; a folder upload sends only file names (they all go "
            "into one `<repeats>_<subject>` folder). To import a folder that is already on the server, run "
            f"`python -m kohya_backend datasets import PATH --home {self.datasets.home.root}` in the "
            "extension's folder there: the tab does not offer it, because the tab may be reachable from the "
            "network and that command reads any folder of the machine."
        )

    def open(self, name: str | None) -> tuple[str, list[tuple[Any, str]], Any, list[str], list[str]]:
        """(report, thumbnails, image choices, names and labels of the thumbnails) of a dataset."""
        if not name:
            return "No dataset chosen.", [], dropdown([], None), [], []
        try:
            shown = self.datasets.show(name)
        except TrainManagementError as exc:
            return error_markdown(exc), [], dropdown([], None), [], []
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
        return report, thumbnails, dropdown(images, None), names, labels

    def validate(self, name: str | None) -> tuple[str, str]:
        """Start the trainer's full validation (every image decoded, in the background); (message, ticket)."""
        if not name:
            return "No dataset chosen.", ""
        try:
            ticket = self.datasets.start_validate(name)
        except TrainManagementError as exc:
            return error_markdown(exc), ""
        return f"⏳ Validating **{name}**: decoding every image…", ticket

    def pick_thumbnail(self, names: list[str], evt: gr.SelectData) -> Any:
        """A click on a thumbnail selects that image in the caption editor."""
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            return gr.update(value=names[int(index)])
        except (IndexError, TypeError, ValueError):
            return gr.update()

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

    def delete_image(self, name: str | None, image: str | None) -> str:
        """Delete the selected image and its caption."""
        if not name or not image:
            return "Choose a dataset and an image first."
        try:
            self.datasets.delete_image(name, image)
        except TrainManagementError as exc:
            return "❌ " + error_markdown(exc)
        return f"Deleted `{image}`."

    def delete_dataset(self, name: str | None, confirmed: bool) -> tuple[str, Any, bool]:
        """Delete the chosen dataset when the confirmation box is ticked; (message, choices, confirmation)."""
        if not name:
            return "No dataset chosen.", gr.update(), False
        if not confirmed:
            return f"Tick the box to confirm deleting **{name}** and all its files.", gr.update(), False
        try:
            self.datasets.delete(name)
        except TrainManagementError as exc:
            return "❌ " + error_markdown(exc), gr.update(), False
        return f"Deleted dataset **{name}**.", self.choices(None), False
