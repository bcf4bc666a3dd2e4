"""Typed errors a user can act on: each says what is wrong, where, and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass


class TrainManagementError(Exception):
    """Base of every error this project raises on purpose; `hint` says how to fix it.

    `http_status` is what the REST API and the worker answer with (subclasses say 404, 409, ...); `details()` adds
    the error's own fields (issues, files, job ids) to the answer's body.
    """

    http_status = 400
    web_hint: str | None = None  # the fix as done in the tab, when it differs from `hint` (the CLI's way)

    def __init__(self, message: str, hint: str | None = None, *, web_hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if web_hint is not None:
            self.web_hint = web_hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message

    def details(self) -> dict[str, object]:
        """Fields beyond message and hint that a client can act on."""
        return {}


@dataclass
class ConfigIssue:
    """One problem in config_params, located by key and, when known, line and column (1-based)."""

    message: str
    key: str | None = None
    line: int | None = None
    column: int | None = None
    hint: str | None = None
    severity: str = "error"  # "error" or "warning"

    def render(self) -> str:
        where = ""
        if self.line is not None:
            where = f"line {self.line}" + (f", column {self.column}" if self.column else "") + ": "
        key = f"{self.key}: " if self.key else ""
        text = f"{where}{key}{self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    def to_dict(self) -> dict[str, object]:
        return {
            "message": self.message,
            "key": self.key,
            "line": self.line,
            "column": self.column,
            "hint": self.hint,
            "severity": self.severity,
        }


class ConfigError(TrainManagementError):
    """config_params failed to parse or validate; `issues` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        lines = "\n".join(f"  - {i.render()}" for i in issues)
        super().__init__(f"config_params has {len(issues)} problem(s):\n{lines}")

    def details(self) -> dict[str, object]:
        return {"issues": [i.to_dict() for i in self.issues]}


class DatasetError(TrainManagementError):
    """The dataset cannot be trained on (layout, images, repeats); `files` names the culprits."""

    def __init__(self, message: str, hint: str | None = None, files: list[str] | None = None) -> None:
        super().__init__(message, hint)
        self.files = files or []

    def details(self) -> dict[str, object]:
        return {"files": [str(f) for f in self.files]}


class InUse(TrainManagementError):
    """Jobs that may still need something (a worker, a blob) block the action; `job_ids` lists them."""

    http_status = 409

    def __init__(self, message: str, hint: str | None, job_ids: list[str]) -> None:
        super().__init__(message, hint)
        self.job_ids = job_ids

    def details(self) -> dict[str, object]:
        return {"jobs": self.job_ids}


class ModelError(TrainManagementError):
    """A checkpoint cannot be read or loaded, or is not of the expected family."""


class FamilyMismatchError(ModelError):
    """The checkpoint's detected family differs from the chosen FM type."""


class TokenizerUnavailableError(ModelError):
    """No tokenizer can be found offline."""


class OptimizerUnavailableError(TrainManagementError):
    """The requested optimizer cannot be created here (missing package, no CUDA for 8-bit)."""


class TrainingError(TrainManagementError):
    """Training stopped for a reason the user can act on (NaN loss, out of memory, disk full)."""


class StorageError(TrainManagementError):
    """An object store (S3 or S3-compatible) refused or failed a request; the message names the bucket/key and
    the store's error code, the hint what to check."""

    def __init__(self, message: str, hint: str | None = None, *, code: str | None = None) -> None:
        super().__init__(message, hint)
        self.code = code

    def details(self) -> dict[str, object]:
        return {"code": self.code} if self.code else {}
