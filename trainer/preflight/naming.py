"""The words advice uses for a setting: the config key headless, the widget as the node shows it inside ComfyUI.

A check writes a setting it names in its text as a marker, ``setting_ref("optimizer.warmup_steps")`` ->
``"{optimizer.warmup_steps}"``, and the front-end's :class:`Naming` turns each marker into its own words when the
message is shown: :data:`CONFIG_KEYS` (the CLI, the default) writes the key as in the config file
(``optimizer.warmup_steps``); the ComfyUI pack passes a Naming built from its widget table (``nodes/widget_names.py``)
that writes ``Configure LoRA's warmup_steps``. Dotted config keys written without a marker (older messages) are
renamed too; bare words such as ``steps`` are not, since they also occur as ordinary words.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

_MARKER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")


def setting_ref(key: str) -> str:
    """The marker for config key ``key`` in an advice text (see the module docstring)."""
    return "{" + key + "}"


class Naming:
    """Renders config keys in advice texts. ``names`` maps a config key to the words for it (unmapped keys stay
    as they are)."""

    def __init__(self, names: Optional[Mapping[str, str]] = None):
        self.names = dict(names or {})
        dotted = sorted((k for k in self.names if "." in k), key=len, reverse=True)
        # a dotted key standing alone: not inside a longer key ("network.rank_dropout") or a path
        self._bare = re.compile(r"(?<![\w.{])(" + "|".join(map(re.escape, dotted)) + r")(?![\w}]|\.\w)") \
            if dotted else None

    def __call__(self, key: str) -> str:
        return self.names.get(key, key)

    def text(self, text: str) -> str:
        """``text`` with every marker, and every mapped dotted key, in this front-end's words."""
        text = _MARKER.sub(lambda m: self(m.group(1)), text)
        if self._bare is not None:
            text = self._bare.sub(lambda m: self(m.group(1)), text)
        return text


CONFIG_KEYS = Naming()  # headless: the keys as written in the config file
