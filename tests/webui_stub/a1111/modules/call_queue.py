"""Mirrors modules/call_queue.py: the lock every GPU job of the WebUI (generation, interrogation) holds."""

import threading

queue_lock = threading.Lock()
