"""Stand-in for timm (see tests/integrations/stubs/README.md): names import, using them raises."""

from timm import __getattr__  # noqa: F401  (the one stand-in, shared by every stub module)
