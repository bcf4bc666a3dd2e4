"""What a host application (the WebUI adapter in scripts/, install.py, preload.py) needs that does not need the host.

Everything here is plain Python over duck-typed host objects, so it is tested without the WebUI; the adapter only
looks the WebUI's objects up and passes them in. Modules import nothing heavy at import time, and the ones that
install.py and preload.py use (flags, install, trainer_env) run on Python 3.10 with the standard library plus
`packaging`.
"""
