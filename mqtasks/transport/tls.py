"""TLS for ``amqps://``, ``rediss://`` and ``rediss+kombu://``: verified by default.

The client libraries underneath do not all verify what they should when left
to their defaults: py-amqp checks the certificate chain but not the host name
unless it is told the name, and kombu's Redis transport turns verification off
altogether for a ``rediss://`` URL without options. :class:`TLSOptions` is the
one place TLS is configured in mqtasks; each transport turns it into its
library's arguments, always with the certificate and the host name checked
unless ``verify=False`` says otherwise (which is logged once as a warning).
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import structlog

from .._url import mask_url
from ..exceptions import ConfigurationError

__all__ = ["TLS_SCHEMES", "TLSOptions", "check_url_options", "tls_failure"]

logger = structlog.get_logger("mqtasks.transport.tls")

#: URL schemes that connect with TLS.
TLS_SCHEMES = frozenset({"amqps", "rediss", "rediss+kombu", "rediss+sentinel"})

_ENV = {
    "ca_file": "MQTASKS_TLS_CA_FILE",
    "cert_file": "MQTASKS_TLS_CERT_FILE",
    "key_file": "MQTASKS_TLS_KEY_FILE",
    "verify": "MQTASKS_TLS_VERIFY",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

_warned: set[str] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class TLSOptions:
    """How to connect to a broker over TLS (``amqps://``, ``rediss://``).

    The broker's certificate must chain to a trusted CA (``ca_file``, else the
    system's CAs) and name the host of the broker URL, unless ``verify`` is False.

    Args:
        ca_file: PEM file of the CA certificates to trust instead of the system's.
        cert_file: PEM file of this client's certificate (for brokers that ask for one).
        key_file: PEM file of the client certificate's private key, if not in ``cert_file``.
        verify: Check the broker's certificate and host name. ``False`` accepts any
            certificate, which anyone between you and the broker can forge; it is
            logged as a warning.

    Example::

        App("shop", broker="amqps://user:pass@rabbit.internal//",
            tls=TLSOptions(ca_file="/etc/ssl/internal-ca.pem"))
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        if not isinstance(self.verify, bool):
            raise ConfigurationError(
                f"TLSOptions.verify must be True or False, not {self.verify!r}."
            )
        if self.key_file is not None and self.cert_file is None:
            raise ConfigurationError(
                "TLSOptions.key_file needs cert_file (the client certificate)."
            )

    @property
    def is_default(self) -> bool:
        """Whether nothing was configured (system CAs, verification on)."""
        return self == TLSOptions()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TLSOptions | None:
        """Build options from ``MQTASKS_TLS_CA_FILE``, ``MQTASKS_TLS_CERT_FILE``,
        ``MQTASKS_TLS_KEY_FILE`` and ``MQTASKS_TLS_VERIFY``; None if none is set.

        Raises:
            ConfigurationError: ``MQTASKS_TLS_VERIFY`` is not a boolean word.
        """
        values: dict[str, Any] = {}
        for name, var in _ENV.items():
            raw = environ.get(var)
            if raw:
                values[name] = raw
        if not values:
            return None
        if "verify" in values:
            word = values["verify"].strip().lower()
            if word not in _TRUE | _FALSE:
                raise ConfigurationError(
                    f"MQTASKS_TLS_VERIFY={values['verify']!r} is not a boolean (true or false)."
                )
            values["verify"] = word in _TRUE
        return cls(**values)

    def check(self) -> None:
        """Load the files once, so that a wrong path or key fails now, with its name.

        Raises:
            ConfigurationError: A file is missing or not a usable certificate or key.
        """
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigurationError(f"TLS {name} {path!r} does not exist or is not a file.")
        context = ssl.create_default_context()
        try:
            if self.ca_file is not None:
                context.load_verify_locations(cafile=self.ca_file)
            if self.cert_file is not None:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"TLS files could not be loaded ({type(exc).__name__}: {exc}); ca_file must hold "
                "PEM CA certificates, cert_file a PEM certificate and key_file its private key."
            ) from exc

    def amqp_ssl(self, hostname: str | None) -> dict[str, Any]:
        """The ``ssl`` argument of py-amqp (through kombu) for a broker at ``hostname``.

        Args:
            hostname: The host the URL names, checked against the certificate;
                None lets kombu use the host of each connection.
        """
        options: dict[str, Any] = {}
        if self.cert_file is not None:
            options["certfile"] = self.cert_file
            options["keyfile"] = self.key_file
        if not self.verify:
            options["cert_reqs"] = ssl.CERT_NONE
            return options
        # py-amqp checks the host name only when it is given one.
        options["cert_reqs"] = ssl.CERT_REQUIRED
        options["server_hostname"] = hostname
        if self.ca_file is not None:
            options["ca_certs"] = self.ca_file
        return options

    def redis_kwargs(self) -> dict[str, Any]:
        """The ``ssl_*`` arguments of a redis-py connection."""
        kwargs: dict[str, Any] = {
            "ssl_cert_reqs": "required" if self.verify else "none",
            "ssl_check_hostname": self.verify,
        }
        if self.ca_file is not None:
            kwargs["ssl_ca_certs"] = self.ca_file
        if self.cert_file is not None:
            kwargs["ssl_certfile"] = self.cert_file
            kwargs["ssl_keyfile"] = self.key_file
        return kwargs

    def apply(self, url: str) -> bool:
        """Check these options against the broker ``url``; return whether it uses TLS.

        Logs ``tls.unverified`` once per broker when ``verify`` is off.

        Raises:
            ConfigurationError: TLS options are set for a URL without TLS, TLS
                settings are in the URL, or the files cannot be loaded.
        """
        check_url_options(url)
        scheme = urlsplit(url).scheme.lower() if "://" in url else ""
        if scheme not in TLS_SCHEMES:
            if not self.is_default:
                raise ConfigurationError(
                    f"TLS options are set but the broker URL {mask_url(url)} does not use TLS; "
                    f"use one of {', '.join(sorted(TLS_SCHEMES))}:// or drop the TLS options."
                )
            return False
        self.check()
        if not self.verify:
            masked = mask_url(url)
            with _warned_lock:
                first = masked not in _warned
                _warned.add(masked)
            if first:
                logger.warning(
                    "tls.unverified",
                    broker=masked,
                    note="TLSOptions(verify=False): any certificate is accepted, "
                    "so the connection can be intercepted",
                )
        return True


def check_url_options(url: str) -> None:
    """Refuse TLS settings in the query of a broker URL.

    kombu and redis-py read ``ssl``/``ssl_*`` query parameters and let them
    override the arguments mqtasks gives, ``ssl_cert_reqs=none`` included; a URL
    copied from elsewhere must not turn verification off unnoticed.

    Raises:
        ConfigurationError: The query holds ``ssl`` or an ``ssl_*`` parameter.
    """
    query = urlsplit(url).query if "://" in url else ""
    names = sorted({k for k, _ in parse_qsl(query) if k == "ssl" or k.startswith("ssl_")})
    if names:
        raise ConfigurationError(
            f"The broker URL sets {', '.join(names)}: configure TLS with "
            "Settings.tls = TLSOptions(...) (or MQTASKS_TLS_* variables), not in the URL."
        )


def tls_failure(exc: BaseException | None) -> str | None:
    """Return why the TLS handshake failed if ``exc`` (or its cause chain) says so."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return str(exc.verify_message or exc.reason or exc)
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return text.split("certificate verify failed:", 1)[-1].strip(" ().")
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
