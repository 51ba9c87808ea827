"""WISP chat: a Kivy app that drafts on the device and verifies in the cloud (see main.py).

`state` (settings, history), `worker` (generation off the UI thread) and `chat` (the controller)
need no Kivy; `main` and `wisp_chat.kv` are the widgets.
"""
