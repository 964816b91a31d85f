"""Where: one adapter per model family (which modules are self-attention, how a call's layout is read)."""

from . import (  # noqa: F401  (register their adapters)
    allegro,
    anyflow,
    auraflow,
    bria,
    chroma,
    cogvideox,
    cogview4,
    cosmos,
    cosmos3,
    easyanimate,
    flux,
    flux2,
    flux3,
    helios,
    hidream,
    hunyuan_image,
    hunyuan_video,
    hunyuan_video15,
    kandinsky5,
    kandinsky6,
    krea2,
    latte,
    longcat_image,
    ltx,
    ltx2,
    lumina2,
    mochi,
    motif_video,
    ovis_image,
    pixart,
    qwenimage,
    qwenimage21,
    sd3,
    wan,
    z_image,
)
from .base import ModelAdapter
from .registry import adapter_for, find_transformers, register_adapter

__all__ = ["ModelAdapter", "adapter_for", "find_transformers", "register_adapter"]
