"""SGLang integration of mm-scheduler: a plugin that coalesces vision-encoder work.

The entry point is :func:`integration.sglang_plugin.register` (group ``sglang.srt.plugins``). Importing
this package stays light (no torch, no prometheus_client): SGLang loads plugins in its launcher
before it has set up Prometheus' multiprocess directory.
"""
