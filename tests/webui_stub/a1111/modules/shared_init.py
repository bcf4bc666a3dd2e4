"""Mirrors the WebUI's start-up up to loading scripts: parser + preload.py flags, cmd_opts, paths, opts,
checkpoints, interrogator, a loaded model (shared_cmd_options.py, shared_init.py and initialize.py)."""

import os

from modules import cmd_args, interrogate, options, paths_internal, script_loading, sd_models, shared


class LoadedModel:
    """What shared.sd_model holds once a checkpoint is loaded (is_sd1 etc. as the real model object)."""

    is_sd1 = True
    is_sd2 = False
    is_sdxl = False


def initialize(argv, extension_dirs, data_dir):
    paths_internal.configure(data_dir)
    parser = cmd_args.make_parser()
    script_loading.preload_extensions(extension_dirs, parser)
    shared.parser = parser
    shared.cmd_opts = parser.parse_args(list(argv))
    shared.opts = options.Options({}, os.path.join(paths_internal.data_path, "config.json"))
    shared.opts.load()
    sd_models.configure()
    sd_models.list_models()
    shared.interrogator = interrogate.InterrogateModels()
    shared.sd_model = LoadedModel()
