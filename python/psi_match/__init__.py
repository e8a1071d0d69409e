"""Ask a private (name, ID) match service whether pairs are in the registry.

The institution's client of ``psi-server`` for Python, built on the same Rust
code as the ``psi-client`` command line, so both give the same answers::

    import psi_match

    client = psi_match.Client(
        server="https://psi.example.gov.cn:50051",
        purpose="kyc-onboarding",
        tls=psi_match.Tls(ca="ca.pem", cert="bank-001.pem", key="bank-001.key"),
    )
    client.check("张伟", "11010519491231002X")         # Answer(result='match', error=None)
    client.batch([("张伟", "11010519491231002X"), ...])  # a list of Answers, in order
    client.batch(df)                                   # a pandas DataFrame plus result, error

Settings not given come from the environment (``PSI_SERVER``, ``PSI_PURPOSE``,
``PSI_TLS_CA``, ...) and then the client config file
(``~/.config/psi-client/config.toml`` or ``config=``), as for the CLI.

The protocol's primitives are here too, for experiments: ``encode_record``,
``ServerKey`` (``blind_evaluate``, ``evaluate``), ``blind`` and
``BlindState.finalize``, ``tag``, ``bucket`` and ``TagSet``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from os import PathLike
from typing import Any, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from ._native import (
    BlindState,
    PsiError,
    ServerKey,
    TagSet,
    blind,
    bucket,
    encode_record,
    tag,
    verify_log,
)
from . import _native

__all__ = [
    "Answer",
    "BlindState",
    "Client",
    "PsiError",
    "verify_log",
    "ServerKey",
    "TagSet",
    "Tls",
    "blind",
    "bucket",
    "encode_record",
    "tag",
]

#: Headers recognised as the name column (case-insensitive), as by the CLI.
NAME_HEADERS = ("name", "姓名")
#: Headers recognised as the ID number column.
ID_HEADERS = ("id", "身份证号", "身份证号码")

Path = Union[str, "PathLike[str]"]


@dataclass(frozen=True)
class Answer:
    """One pair's answer, as in the CLI's ``result`` and ``error`` columns.

    ``result`` is ``"match"``, ``"no_match"`` or ``"invalid"``; ``error`` says
    why an invalid pair is invalid (nothing was sent for it).
    """

    result: str
    error: Optional[str] = None

    @property
    def matched(self) -> bool:
        """Whether the pair is in the registry."""
        return self.result == "match"

    @property
    def valid(self) -> bool:
        """Whether the pair was a valid (name, ID) pair, and so was asked."""
        return self.result != "invalid"

    def __bool__(self) -> bool:
        # "if client.check(...)" would be true for no_match and invalid too.
        raise TypeError("an Answer has three values: test answer.matched, or answer.result")


class Tls(NamedTuple):
    """The operator's CA certificate and this institution's certificate and
    private key (PEM files, as ``psi-server ca issue`` writes them)."""

    ca: Path
    cert: Path
    key: Path


class Client:
    """A connection to a psi-server.

    ``server``, ``purpose`` and ``tls`` (a :class:`Tls`, a dict with ``ca``,
    ``cert`` and ``key``, or a 3-tuple of paths) are the usual settings;
    ``pin_key`` (the operator's published public key, hex: a root of trust
    whose endorsed rotations are followed), ``pin_exact`` (accept only that
    key), ``cache_dir``, ``concurrency`` and ``config`` (a client config
    file) are as for the CLI.
    ``mode`` is the default query mode: ``"bucket"`` (nothing downloaded),
    ``"pir"`` (nothing downloaded and the server learns not even the
    pair's bucket; about a second of server work per pair) or ``"sync"``
    (the tag set downloaded once, refreshed when it changes);
    by default, like the CLI, ``check`` uses bucket and ``batch`` sync.
    ``query_log`` (a path) records every pair checked in the institution's
    hash-chained query log (SQLite, created mode 0600), as ``staff`` (who
    asks), each request carrying the commitment to its records for the
    regulator's check (``psi-client log open``); :func:`verify_log` checks
    the chain.

    Raises :class:`ValueError` for bad settings and :class:`PsiError` when
    the server cannot be reached or refuses.
    """

    def __init__(
        self,
        server: Optional[str] = None,
        purpose: Optional[str] = None,
        tls: Union[Tls, Mapping[str, Path], Sequence[Path], None] = None,
        *,
        pin_key: Optional[str] = None,
        pin_exact: Optional[bool] = None,
        cache_dir: Optional[Path] = None,
        concurrency: Optional[int] = None,
        config: Optional[Path] = None,
        mode: Optional[str] = None,
        query_log: Optional[Path] = None,
        staff: Optional[str] = None,
    ) -> None:
        if mode not in (None, "bucket", "sync", "pir"):
            raise ValueError(f'mode must be "bucket", "sync" or "pir", not {mode!r}')
        ca, cert, key = _tls_files(tls)
        self._session = _native.Session(
            server,
            purpose,
            ca,
            cert,
            key,
            pin_key,
            cache_dir,
            concurrency,
            config,
            pin_exact,
            query_log,
            staff,
        )
        self.mode = mode
        #: The last batch's summary line (rows, answers, time, registry version).
        self.last_summary: Optional[str] = None

    @property
    def info(self) -> dict:
        """The server's parameters (key epoch, registry version and size, ...)."""
        return self._session.info()

    @property
    def settings(self) -> str:
        """The settings in force and where each came from (no secrets)."""
        return self._session.settings()

    @property
    def trusted_on_first_use(self) -> bool:
        """True if this connection trusted the server's key on first use:
        compare ``info["public_key"]`` with the key the operator published."""
        return self._session.trusted_on_first_use()

    def check(self, name: str, id: str, *, mode: Optional[str] = None) -> Answer:
        """Whether one (name, ID) pair is in the registry."""
        result, error = self._session.check(
            _text(name, "name"), _text(id, "id"), mode or self.mode or "bucket"
        )
        return Answer(result, error)

    def batch(
        self,
        rows: Any,
        *,
        mode: Optional[str] = None,
        name_column: Optional[str] = None,
        id_column: Optional[str] = None,
        chunk_rows: int = 8192,
    ) -> Any:
        """Answers many pairs, in order.

        ``rows`` is an iterable of ``(name, id)`` pairs, giving a list of
        :class:`Answer`; or a pandas DataFrame with a name column and an ID
        column (``name``/``姓名`` and ``id``/``身份证号``/``身份证号码``, or
        ``name_column``/``id_column``), giving a copy with ``result`` and
        ``error`` columns added. An ID number held as a float (as pandas
        reads a numeric Excel or CSV column) is answered invalid, saying so:
        it may have lost digits; read the column as text (``dtype=str``).
        """
        mode = mode or self.mode or "sync"
        if _is_dataframe(rows):
            return self._batch_frame(rows, mode, name_column, id_column, chunk_rows)
        if name_column is not None or id_column is not None:
            raise TypeError("name_column and id_column apply to a DataFrame, not to pairs")
        pairs = []
        for i, row in enumerate(rows):
            try:
                if isinstance(row, (str, bytes)):
                    raise TypeError  # a two-character string would unpack
                name, id_ = row
            except (TypeError, ValueError):
                raise TypeError(f"row {i} is not a (name, id) pair") from None
            pairs.append((name, id_))
        return self._answer(pairs, mode, chunk_rows)

    def evaluate(self, inputs: Iterable[bytes]) -> List[bytes]:
        """The service's PRF outputs (64 bytes each) for arbitrary inputs,
        blinded, evaluated by the server and verified here."""
        return self._session.evaluate([bytes(i) for i in inputs])

    def sync(self) -> TagSet:
        """Brings the cached tag set up to date and returns it."""
        return self._session.sync()

    def _answer(self, pairs: List[Tuple[Any, Any]], mode: str, chunk_rows: int) -> List[Answer]:
        answers: List[Optional[Answer]] = [None] * len(pairs)
        asked: List[Tuple[str, str]] = []
        where: List[int] = []
        # Rows answered here, never sent: still checks the query log records.
        unsent: List[Tuple[str, str]] = []
        for i, (name, id_) in enumerate(pairs):
            known = _number_id(id_)
            if known is not None:
                answers[i] = known
                unsent.append((str(name), str(id_)))
                continue
            try:
                asked.append((_text(name, "name"), _text(id_, "id")))
            except TypeError as e:
                # One odd cell is that row's answer, as in the CLI.
                answers[i] = Answer("invalid", str(e))
                unsent.append((str(name), str(id_)))
                continue
            where.append(i)
        if unsent:
            self._session.record_invalid(unsent, mode)
        if asked:
            got, self.last_summary = self._session.batch(asked, mode, chunk_rows)
            for i, (result, error) in zip(where, got):
                answers[i] = Answer(result, error)
        return answers  # type: ignore[return-value]

    def _batch_frame(self, frame, mode, name_column, id_column, chunk_rows):
        name_col = _column(frame, name_column, NAME_HEADERS, "name")
        id_col = _column(frame, id_column, ID_HEADERS, "id")
        for added in ("result", "error"):
            if any(str(c).strip().lower() == added for c in frame.columns):
                raise ValueError(
                    f"the DataFrame already has a {added!r} column; rename it, the answers add it"
                )
        answers = self._answer(
            list(zip(frame[name_col].tolist(), frame[id_col].tolist())), mode, chunk_rows
        )
        out = frame.copy()
        out["result"] = [a.result for a in answers]
        out["error"] = [a.error or "" for a in answers]
        return out


def _tls_files(tls) -> Tuple[Optional[Path], Optional[Path], Optional[Path]]:
    if tls is None:
        return None, None, None
    if isinstance(tls, Mapping):
        missing = {"ca", "cert", "key"} - set(tls)
        if missing:
            raise ValueError(f"tls needs ca, cert and key; missing {', '.join(sorted(missing))}")
        return tls["ca"], tls["cert"], tls["key"]
    files = tuple(tls)
    if len(files) != 3:
        raise ValueError("tls is (ca, cert, key): three PEM files")
    return files  # type: ignore[return-value]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any, what: str) -> str:
    """A cell as text: strings as they are, whole numbers in digits, an
    empty cell (None, NaN, pandas' NA) as empty text."""
    if isinstance(value, str):
        return value
    if _missing(value) or type(value).__name__ in ("NAType", "NaTType"):
        return ""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    raise TypeError(f"the {what} must be text, not {type(value).__name__}")


def _number_id(value: Any) -> Optional[Answer]:
    """An ID number held as a floating-point number: digits may be lost
    (a double holds 15-17 significant digits; Excel keeps 15)."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        if _missing(value):
            return None
        return Answer(
            "invalid",
            f"the ID number is the floating-point number {value!r}, which may have lost digits "
            "(Excel keeps 15 significant digits): read the column as text (dtype=str)",
        )
    return None


def _is_dataframe(rows: Any) -> bool:
    try:
        import pandas
    except ImportError:
        return False
    return isinstance(rows, pandas.DataFrame)


def _column(frame, named: Optional[str], defaults: Sequence[str], what: str):
    wanted = [named] if named is not None else list(defaults)
    for want in wanted:
        for c in frame.columns:
            if str(c).strip().lower() == want.lower():
                return c
    raise ValueError(
        f"the DataFrame has no {what} column ({' or '.join(wanted)}); "
        f"name it with {what}_column="
    )
