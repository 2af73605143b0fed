"""SGLang integration of mm-scheduler: a plugin that coalesces vision-encoder work.

Installed as ``mm_scheduler_sglang`` (from the ``integration/`` folder). The entry point is
:func:`mm_scheduler_sglang.sglang_plugin.register` (group ``sglang.srt.plugins``). Importing
this package stays light (no torch, no prometheus_client): SGLang loads plugins in its launcher
before it has set up Prometheus' multiprocess directory.
"""
