"""SMTP replies as values, and the catalogue of the ones Epoxi sends.

A reply is a three-digit code, an optional RFC 3463 enhanced status code and text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply, possibly spanning several lines of text."""

    code: int
    enhanced: str = ""
    text: str = ""

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        texts = self.text.split("\n") if self.text else [""]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        return [f"{prefix}{t}".rstrip() for t in texts]

    def encode(self) -> bytes:
        """Render as wire bytes: ``250-first`` lines, then ``250 last``, each ending CRLF."""
        lines = self.lines()
        out = [f"{self.code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        return " ".join(
            p for p in (str(self.code), self.enhanced, self.text.replace("\n", " ")) if p
        )


# Catalogue: the fixed replies of the server. Replies that carry data are built where used.
CLOSING = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
NOOP_OK = Reply(250, "2.0.0", "OK")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")

SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
DATA_TIMEOUT = Reply(421, "4.4.2", "Timeout while reading data, closing connection")
AUTH_THROTTLED = Reply(421, "4.7.0", "Too many authentication failures, try again later")
CHUNK_NOT_READ = Reply(421, "4.5.0", "BDAT chunk not read, closing connection")
SPOOL_UNAVAILABLE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
SPOOL_FAILED = Reply(451, "4.3.0", "Could not store the message, try again later")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")

LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
PIPELINING_FORBIDDEN = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BDAT_BAD_SIZE = Reply(501, "5.5.4", "BDAT needs a chunk size in octets")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Send MAIL first")
NEED_RCPT = Reply(503, "5.5.1", "Send RCPT first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
MIXED_DATA_BDAT = Reply(503, "5.5.1", "DATA and BDAT cannot be mixed in one transaction")
PARAM_NOT_RECOGNIZED = Reply(555, "5.5.4", "Parameter not recognized")
AUTH_MECH_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTHZID_REFUSED = Reply(535, "5.7.8", "Authorization identity must be the user name")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BAD_LINE_ENDINGS = Reply(554, "5.6.0", "Message contains bare CR or bare LF, rejected")
NUL_IN_DATA = Reply(554, "5.6.0", "Message contains NUL octets, rejected")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
BAD_ADDRESS = Reply(553, "5.1.3", "Bad address syntax")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")


def wire(reply: Reply) -> bytes:
    """``reply.encode()``; the replies of the catalogue above are rendered once, at import."""
    data = _WIRE.get(reply)
    return data if data is not None else reply.encode()


_WIRE: dict[Reply, bytes] = {
    r: r.encode() for r in list(globals().values()) if isinstance(r, Reply)
}
