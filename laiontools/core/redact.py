"""Credentials out of what laiontools records: settings files, manifests, logs and error lines.

Credentials belong in the environment or fsspec's configuration (``~/.config/fsspec``, the AWS/GCS
variables and files), which laiontools never writes down. A user may still type one into a flag: a
``--blocklist https://user:token@host/list.txt``, a presigned ``?X-Amz-Signature=...`` URL, or
``spark_conf: {spark.hadoop.fs.s3a.secret.key: ...}``. The run uses what was typed; every record of it
(``settings.json``, a manifest's provenance and settings, the log, the one-line error) holds the
redacted spelling, as pip shows ``https://user:****@host``:

* a URL's userinfo: ``user:secret@`` becomes ``user:***@``, and a lone ``token@`` becomes ``***@``;
* a query parameter that carries a key or a signature (``X-Amz-Signature``, ``X-Goog-Credential``, an
  Azure SAS ``sig``, ``token``, ``access_token``, ``api_key``, ``key``, ...): its value becomes ``***``;
* ``name=value`` text and mapping entries whose name is a secret's (``...secret.key``, ``...password``,
  ``...session.token``, ``...credentials``): the value becomes ``***``.

Redaction is idempotent, so a record compares with the redaction of the settings it was made from
(:func:`laiontools.core.config.changed_settings`). A path read back from a record that was redacted
cannot be opened; :func:`laiontools.core.storage.url_to_fs` refuses it with :func:`redacted_path_error`.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

# scheme://userinfo@ : userinfo stops at the first '/', '?' or '#', so s3://bucket/a@2x.png is a path.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^/?#@\s'\"]+)@")

# Names of query parameters that carry a credential: cloud signatures and signed-URL policies, SAS
# tokens, OAuth tokens, API keys, passwords.
_QUERY_NAME = (r"(?:[\w.\-]*(?:signature|credential|security-token|securitytoken|token|secret|password|passwd|apikey|api_key|"
               r"api-key|access_key|accesskey)[\w.\-]*|sig|key|policy|key-pair-id|auth|authorization|code)")
_QUERY = re.compile(rf"(?i)([?&;]{_QUERY_NAME}=)[^&#\s'\"]*")

# Names of settings whose value is a secret: ...secret, ...secret.key, ...password, ...session.token,
# ...credentials, ...private.key. A key's id (fs.s3a.access.key, aws_access_key_id) is not one.
# (img2dataset's user_agent_token is a name put in the User-Agent, not a secret.)
_SECRET_NAME = (r"(?!user[._\-]?agent[._\-]?token\b)"
                r"[\w.\-]*(?:secret|password|passwd|token|credentials?|private[._\-]?key)(?:[._\-]?(?:key|value|string|json))?")
_SECRET_KEY = re.compile(rf"(?i)^{_SECRET_NAME}$")
_SECRET_ASSIGN = re.compile(rf"(?i)(?<![\w.\-])({_SECRET_NAME}\s*=\s*)[^\s,;&'\"]+")


def _userinfo(m: re.Match[str]) -> str:
    user, colon, _ = m.group(2).partition(":")
    if not colon:
        return m.group(1) + (m.group(2) if m.group(2) == REDACTED else REDACTED) + "@"
    return f"{m.group(1)}{user}:{REDACTED}@"


def redact_text(text: str) -> str:
    """`text` with every credential this module knows replaced by ``***`` (see the module docstring)."""
    if "@" in text:
        text = _USERINFO.sub(_userinfo, text)
    if "=" in text:
        text = _QUERY.sub(lambda m: m.group(1) + REDACTED, text)
        text = _SECRET_ASSIGN.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def redact(obj: Any) -> Any:
    """A copy of `obj` (JSON-like: dicts, lists, strings, numbers) fit to be recorded: strings through
    :func:`redact_text`, and the value of a mapping entry named like a secret replaced whole."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and _SECRET_KEY.match(k) and v not in (None, "") else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


_REDACTED_URL = re.compile(r"(?i)^[a-z][a-z0-9+.\-]*://(?:[^/?#@]*:)?\*\*\*@|[?&;][^=/?#&]+=\*\*\*(?:[&#;]|$)")


def is_redacted(path: str) -> bool:
    """Whether `path` is a URL whose credentials this module replaced (read back from a record): ``***``
    as its userinfo's secret or as a query parameter's value (a key's path may hold ``***`` otherwise)."""
    return _REDACTED_URL.search(path) is not None


def redacted_path_error(path: str) -> str:
    return (f"{path} was read back from a record (settings.json or a manifest), where laiontools writes URLs without "
            "their credentials; give the path again without credentials in it, and put them in the environment or "
            "fsspec's configuration (~/.config/fsspec/conf.json), which is where laiontools expects them")
