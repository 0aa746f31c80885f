"""Stand-in for timm (see tests/integrations/stubs/README.md): names import, using them raises."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    class _Unavailable:
        def __init__(self, *args, **kwargs):
            raise ImportError(f"timm is not installed (test stand-in for timm.{name})")

    _Unavailable.__name__ = name
    return _Unavailable
