"""Keep credentials out of everything the pipeline records (MLflow params, tags, text artifacts, logs).

A secret is the value of any environment variable whose name contains TOKEN, KEY, SECRET or
PASSWORD (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, ...), the
MLflow tracking username, and the user:password part of any URL.
"""

from __future__ import annotations

import os
import re

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
ALSO_SECRET = ("MLFLOW_TRACKING_USERNAME",)
# Shorter values ("1", "true", "none") are settings, not credentials, and replacing them everywhere
# would mangle unrelated text.
MIN_SECRET_LENGTH = 6
URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s:]+(?::[^/@\s]*)?@")
REDACTED = "***"


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    values = {value for name, value in environ.items()
              if (SECRET_NAME.search(name) or name in ALSO_SECRET) and len(value) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    text = URL_CREDENTIALS.sub(lambda m: m.group("scheme") + REDACTED + "@", text)
    for value in secret_values(environ):
        text = text.replace(value, REDACTED)
    return text
