"""Mirrors modules/shared.py: the globals the WebUI shares with extensions (set by shared_init.initialize())."""

from modules import options

cmd_opts = None
parser = None
opts = None
demo = None
sd_model = None
interrogator = None

OptionInfo = options.OptionInfo
options_section = options.options_section
