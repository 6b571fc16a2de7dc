"""Secrets out of every file and line a run writes: the model card's config (:func:`redact`: secrets,
URLs, local paths) and the run's own records -- ``.hydra/*.yaml``, ``result.json``, log lines
(:func:`redact_secrets`: secrets and URL tokens only; local paths are the user's own).

A secret is a value under a key named like one (``*_token``, ``password``, ``api_key``, ``webhook_url``...),
an ``hf_...`` token, the value of a secret environment variable (``HF_TOKEN``...), or a network URL's
path and query (webhooks carry their token there: ``https://host/api/webhooks/1/<token>``).
"""

from __future__ import annotations

import os
import re
from pathlib import PurePath

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|webhook_url|credentials?)($|_)", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_NETWORK_URL = re.compile(r"^(https?|wss?|ftp|file)://", re.IGNORECASE)
_LOCAL_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")


def _env_secrets() -> list[str]:
    return [v for k, v in os.environ.items() if _SECRET_KEY.search(k.lower()) and len(v) >= 8]


def redact(value, key: str = "", _secrets: list[str] | None = None):
    """``value`` (a config tree: dicts, lists, scalars) with nothing private left in its strings.

    * a field named like a secret (``*_token``, ``secret``, ``password``, ``api_key``,
      ``webhook_url``) -> ``<redacted>``;
    * a string holding an ``hf_...`` token or the value of a secret environment variable
      (``HF_TOKEN``, ``WANDB_API_KEY``...) -> ``<redacted>``;
    * a network URL (webhooks carry their token in the path) -> ``<redacted>``;
    * an absolute or home path (output, cache, data, model folders) -> ``<redacted>/<basename>``.
    """
    secrets = _env_secrets() if _secrets is None else _secrets
    if isinstance(value, dict):
        return {k: redact(v, str(k), secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key, secrets) for v in value]
    if not isinstance(value, str) or not value:
        return value
    if _SECRET_KEY.search(key) or _SECRET_VALUE.search(value) or any(s in value for s in secrets):
        return REDACTED
    if _NETWORK_URL.match(value):
        return REDACTED
    if _LOCAL_PATH.match(value):
        name = PurePath(value.replace("\\", "/")).name
        return f"{REDACTED}/{name}" if name and name != "~" else REDACTED
    return value


def redact_yaml(text: str) -> str:
    """The YAML document ``text`` with :func:`redact` applied to every value."""
    import yaml

    return yaml.safe_dump(redact(yaml.safe_load(text)), sort_keys=False, allow_unicode=True)


_URL_IN_TEXT = re.compile(r"\b((?:https?|wss?|ftp)://)([^/\s,'\"@]*@)?([^/\s,'\"?#]+)([^\s,'\"]*)", re.IGNORECASE)
_OVERRIDE = re.compile(r"^([+~]{0,2}[\w.@/-]+)=(.*)$", re.DOTALL)


def redact_url(url: str) -> str:
    """``scheme://host[:port]`` and ``/<redacted>`` for any user info, path or query (the token's place)."""
    return _URL_IN_TEXT.sub(_url_match, str(url))


def _url_match(m: re.Match) -> str:
    scheme, userinfo, host, rest = m.group(1), m.group(2), m.group(3), m.group(4)
    hidden = bool(userinfo) or rest not in ("", "/")
    return f"{scheme}{host}/{REDACTED}" if hidden else f"{scheme}{host}{rest}"


def redact_secrets(value, key: str = "", _secrets: list[str] | None = None):
    """``value`` (a config tree or a string) with its secrets replaced by ``<redacted>`` and local
    paths kept: secret-named keys (also in ``key=value`` override strings), ``hf_`` tokens, secret
    environment values, and every network URL's path and query (:func:`redact_url`)."""
    secrets = _env_secrets() if _secrets is None else _secrets
    if isinstance(value, dict):
        return {k: redact_secrets(v, str(k), secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v, key, secrets) for v in value]
    if not isinstance(value, str) or not value:
        return value
    if _SECRET_KEY.search(key):
        return REDACTED
    override = _OVERRIDE.match(value)
    if override and _SECRET_KEY.search(override.group(1).rsplit(".", 1)[-1]):
        return f"{override.group(1)}={REDACTED}"
    value = _SECRET_VALUE.sub(REDACTED, value)
    for secret in secrets:
        value = value.replace(secret, REDACTED)
    return redact_url(value)
