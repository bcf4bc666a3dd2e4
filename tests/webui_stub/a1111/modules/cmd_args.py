"""Mirrors modules/cmd_args.py: the WebUI's argparse parser, with the flags the adapter reads."""

import argparse


def make_parser():
    """A fresh parser (the real module builds one at import; tests start several WebUIs in one process)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=str, default=None, help="base path where all user data is stored")
    parser.add_argument("--ckpt-dir", type=str, default=None, help="path to a directory with checkpoints")
    parser.add_argument("--api", action="store_true", help="use api=True to launch the API with the webui")
    parser.add_argument(
        "--api-auth", type=str, default=None, help='API auth "username:password"; comma-delimit'
    )
    parser.add_argument("--gradio-auth", type=str, default=None, help='gradio auth "username:password"')
    parser.add_argument("--gradio-auth-path", type=str, default=None, help="gradio auth file path")
    parser.add_argument(
        "--nowebui", action="store_true", help="use api=True to launch the API instead of the UI"
    )
    parser.add_argument("--skip-install", action="store_true", help="skip installation of packages")
    parser.add_argument(
        "--cors-allow-origins",
        type=str,
        default=None,
        help="Allowed CORS origin(s) (comma-separated, no spaces)",
    )
    parser.add_argument(
        "--cors-allow-origins-regex",
        type=str,
        default=None,
        help="Allowed CORS origin(s) as a regular expression",
    )
    # Parsed for shared_init's disable_extension_access; the stand-in still serves on 127.0.0.1 only.
    parser.add_argument("--listen", action="store_true", help="launch gradio with 0.0.0.0 as server name")
    parser.add_argument("--server-name", type=str, default=None, help="sets hostname of server")
    parser.add_argument("--share", action="store_true", help="use share=True for gradio")
    parser.add_argument("--ngrok", type=str, default=None, help="ngrok authtoken")
    parser.add_argument(
        "--enable-insecure-extension-access",
        action="store_true",
        help="enable extensions tab regardless of other options",
    )
    return parser
