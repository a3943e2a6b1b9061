"""ipywidgets explorers for live-coding, each a thin layer over a pure function of lecturekit.

The pattern (STYLE.md): a pure function computes what is shown (tested on its own); the widget only
wires sliders to it and redraws. Works with ipywidgets 7.7 (Colab) and 8.
"""
from __future__ import annotations

# ---- What the network learned (notebook 03): layer/channel explorer -----------------------------

# ---- Which pixels matter (notebook 04): occlusion explorer --------------------------------------

# ---- Synthesizing images (notebooks 08-10): prior-strength explorer ------------------------------
