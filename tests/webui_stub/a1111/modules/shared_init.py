"""Mirrors the WebUI's start-up up to loading scripts: parser + preload.py flags, cmd_opts (with
webui_is_non_local and disable_extension_access), paths, opts, checkpoints, interrogator, a loaded model
(shared_cmd_options.py, shared_init.py and initialize.py)."""

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
    # As modules/shared_cmd_options.py: a UI reachable from the network keeps extension access off unless asked.
    cmd_opts = shared.cmd_opts
    cmd_opts.webui_is_non_local = any([cmd_opts.share, cmd_opts.listen, cmd_opts.ngrok, cmd_opts.server_name])
    cmd_opts.disable_extension_access = (
        cmd_opts.webui_is_non_local and not cmd_opts.enable_insecure_extension_access
    )
    shared.opts = options.Options({}, os.path.join(paths_internal.data_path, "config.json"))
    shared.opts.load()
    sd_models.configure()
    sd_models.list_models()
    shared.interrogator = interrogate.InterrogateModels()
    shared.sd_model = LoadedModel()
