"""When the WebUI is reachable from the network, what the extension keeps closed: AUTOMATIC1111's own rule.

AUTOMATIC1111 1.10 and Forge set `cmd_opts.disable_extension_access` when the UI listens beyond this machine
(--listen, --server-name, --share, --ngrok) unless --enable-insecure-extension-access is given, and then refuse
to install extensions from the UI. The extension follows that rule for what would let a stranger make this machine
send its checkpoints and datasets anywhere (registering a worker) or delete jobs and datasets: without
credentials the REST API is not mounted, and without a login on the UI the tab does not add or remove workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kohya_backend.service.guard import GuardPolicy

NETWORK_FLAGS = ("share", "listen", "ngrok", "server_name")
_ENABLE = "--enable-insecure-extension-access if you trust everyone who can reach this machine"
_REACHABLE = "the WebUI is reachable from the network (--listen, --server-name or --share)"


def extension_access_disabled(cmd_opts: Any) -> bool:
    """The WebUI's `disable_extension_access`; computed the WebUI's way when a build does not set it."""
    value = getattr(cmd_opts, "disable_extension_access", None)
    if value is not None:
        return bool(value)
    reachable = any(getattr(cmd_opts, flag, None) for flag in NETWORK_FLAGS)
    return reachable and not getattr(cmd_opts, "enable_insecure_extension_access", False)


def api_refusal(access_disabled: bool, has_credentials: bool, prefix: str) -> str | None:
    """Why the REST API is not mounted (None: mount it), with how to enable it."""
    if not access_disabled or has_credentials:
        return None
    return (
        f"Train Management: {_REACHABLE} without --api-auth or --gradio-auth, so its REST API ({prefix}) is "
        "not mounted: anyone on the network could register a worker and have this machine send your "
        "checkpoints and datasets to it, or delete jobs and datasets. To enable it, pass --api-auth "
        f"user:password (the API then asks for those credentials), or {_ENABLE}."
    )


def workers_refusal(access_disabled: bool, has_ui_login: bool, home: Path) -> str | None:
    """Why the tab may not add or remove remote workers (None: it may), with how to enable it."""
    if not access_disabled or has_ui_login:
        return None
    return (
        f"Adding and removing workers in the tab is turned off: {_REACHABLE} without a login, so anyone who "
        "can open this page could have this machine send your checkpoints and datasets to any address. To "
        f"enable it, start the WebUI with --gradio-auth user:password, or {_ENABLE}. On this machine, "
        f"`python -m kohya_backend workers add URL --home {home}` (or --train-worker URL with "
        "--train-worker-token-file FILE) adds workers meanwhile."
    )


def webui_policy(cmd_opts: Any) -> tuple[GuardPolicy, list[str]]:
    """The API's request guard inside the WebUI, from the WebUI's own flags, and the problems found in them.

    Host names: loopback, plus this machine's names and addresses with --listen (or the --server-name),
    plus --train-allowed-hosts; any name with --share or --ngrok, whose tunnel names are not known here (those
    need credentials on the API anyway). Other origins: the WebUI's --cors-allow-origins and
    --cors-allow-origins-regex, as its own CORS allows them (an entry that is not an origin is skipped and named),
    and pages under a --train-allowed-hosts name (a proxy that rewrites Host still serves the page under it).
    The tab's buttons use the same origins (ui/origin_guard.py).
    """
    from kohya_backend.service.guard import BadOrigin, GuardPolicy, configured_origins
    from kohya_backend.service.hosts import answered_hosts, host_name

    problems: list[str] = []
    origins: list[str] = []
    for item in str(getattr(cmd_opts, "cors_allow_origins", None) or "").split(","):
        try:
            origins += configured_origins([item], where="--cors-allow-origins")
        except BadOrigin as exc:
            problems.append(
                f"Train Management: {exc.message}; it is not allowed on the REST API nor in the tab ({exc.hint})"
            )
    extra = tuple(
        n.strip() for v in getattr(cmd_opts, "train_allowed_hosts", None) or () for n in v.split(",")
    )
    listen = "0.0.0.0" if getattr(cmd_opts, "listen", False) else "127.0.0.1"
    bind = getattr(cmd_opts, "server_name", None) or listen  # the WebUI's own choice of address
    tunnel = getattr(cmd_opts, "share", False) or getattr(cmd_opts, "ngrok", None)
    policy = GuardPolicy(
        hosts=None if tunnel else answered_hosts(bind, tuple(n for n in extra if n)),
        origins=tuple(origins),
        origin_regex=getattr(cmd_opts, "cors_allow_origins_regex", None) or None,
        origin_hosts=frozenset(host_name(n) for n in extra if n and n != "*"),
    )
    return policy, problems
