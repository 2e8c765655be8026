"""Which changed settings a running receiver can't apply on SIGHUP (they need a restart)."""

from __future__ import annotations

from typing import Any

from flespi_receiver.config import Settings

# what a SIGHUP applies: the streams' credentials and networks, the TLS files
RELOADABLE_STREAM_KEYS = frozenset({"authorization", "allowed_networks"})
RELOADABLE_SERVER_KEYS = frozenset({"tls_cert", "tls_key"})


def _changed(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(old.keys() | new.keys()):
            found += _changed(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return found
    return [] if old == new else [prefix]


def _plain(settings: Settings) -> dict[str, Any]:
    # python mode keeps SecretStr values, which compare by their secret
    return settings.model_dump(by_alias=True)


def settings_needing_restart(old: Settings, new: Settings) -> list[str]:
    """The dotted names of settings that differ between `old` and `new` and that only a
    restart applies, e.g. ["server.port", "streams[main].path", "streams (added: b)"]."""
    before, after = _plain(old), _plain(new)
    changed = []
    for section in sorted(before.keys() | after.keys()):
        if section == "streams":
            continue
        old_section, new_section = before.get(section) or {}, after.get(section) or {}
        if section == "server":
            old_section = {k: v for k, v in old_section.items() if k not in RELOADABLE_SERVER_KEYS}
            new_section = {k: v for k, v in new_section.items() if k not in RELOADABLE_SERVER_KEYS}
        if section == "columns":
            changed += [] if old_section == new_section else ["columns"]
            continue
        changed += _changed(old_section, new_section, section)
    old_streams = {s["name"]: s for s in before["streams"]}
    new_streams = {s["name"]: s for s in after["streams"]}
    added = sorted(new_streams.keys() - old_streams.keys())
    removed = sorted(old_streams.keys() - new_streams.keys())
    if added or removed:
        parts = [
            f"added: {', '.join(added)}" if added else "",
            f"removed: {', '.join(removed)}" if removed else "",
        ]
        changed.append(f"streams ({'; '.join(p for p in parts if p)})")
    for name in sorted(old_streams.keys() & new_streams.keys()):
        for key in sorted(old_streams[name].keys() - RELOADABLE_STREAM_KEYS):
            if old_streams[name][key] != new_streams[name].get(key):
                changed.append(f"streams[{name}].{key}")
    return changed
