"""Bounded memo tables: the per-shape descriptions that small calls look up instead of
working out again."""


def bounded_put(cache, key, value, limit=4096):
    """``cache[key] = value``, emptying ``cache`` first when it holds ``limit`` entries, so a
    process that sees ever new shapes keeps a bounded table; returns ``value``."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value
