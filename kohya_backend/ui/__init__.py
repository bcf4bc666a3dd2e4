"""The Train Management tab (gradio 3.41 and 4.x) and the standalone app that serves it.

Importing this package is cheap: gradio is imported by the modules that build the tab, and nothing here imports
torch, diffusers or transformers.
"""
