"""Adversarial tables and properties for the pure policy core (beyond the seed's own tests)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import posixpath
import urllib.parse

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.policy import (
    MAX_MODEL_SIZE_BYTES,
    IntegritySpecError,
    LifecycleEvent,
    LifecycleState,
    Reason,
    ResourceLimits,
    ResourceObservation,
    can_serve_inference,
    create_admission_state,
    create_integrity_accumulator,
    create_lifecycle_state,
    create_resource_limits,
    evaluate_admission,
    evaluate_resource_limits,
    evaluate_runtime_request,
    normalize_sha256,
    record_dequeued,
    record_in_flight,
    record_queued,
    record_released,
    transition_lifecycle,
    validate_integrity_spec,
    validate_source_url,
    verify_model_bytes,
)

ALLOW = ["https://models.example.com/models/"]
OK, DENY, BAD, SCHEME = (
    Reason.OK,
    Reason.SOURCE_NOT_ALLOWED,
    Reason.MALFORMED_INPUT,
    Reason.SCHEME_NOT_ALLOWED,
)

# (url, expected reason) against ALLOW
URL_TABLE: list[tuple[object, Reason]] = [
    # the plain cases
    ("https://models.example.com/models/a.gguf", OK),
    ("https://models.example.com/models/sub/dir/a.gguf?download=true#frag", OK),
    ("HTTPS://MODELS.EXAMPLE.COM/models/a.gguf", OK),
    ("https://models.example.com./models/a.gguf", OK),
    ("https://models.example.com:443/models/a.gguf", OK),
    ("https://models.example.com:0443/models/a.gguf", OK),
    ("https://models.example.com/models/", OK),
    ("https://\uff4dodels.example.com/models/a.gguf", OK),  # full-width m, mapped by UTS 46
    # scheme
    ("http://models.example.com/models/a.gguf", SCHEME),
    ("ftp://models.example.com/models/a.gguf", SCHEME),
    ("file:///models/a.gguf", SCHEME),
    ("javascript:alert(1)", SCHEME),
    ("data:text/plain,hi", SCHEME),
    ("//models.example.com/models/a.gguf", BAD),
    ("models.example.com/models/a.gguf", BAD),
    ("https:/models.example.com/models/a.gguf", BAD),
    ("https:models.example.com/models/a.gguf", BAD),
    ("https:///models.example.com/models/a.gguf", BAD),
    ("bad url", BAD),
    ("", BAD),
    # host confusion
    ("https://models.example.com.evil.net/models/a.gguf", DENY),
    ("https://evil.net/models.example.com/models/a.gguf", DENY),
    ("https://evilmodels.example.com/models/a.gguf", DENY),
    ("https://example.com/models/a.gguf", DENY),
    ("https://evil.net?.models.example.com/models/", DENY),
    ("https://evil.net#.models.example.com/models/", DENY),
    ("https://models.example.com%2eevil.net/models/a.gguf", BAD),
    ("https://models%2eexample.com/models/a.gguf", BAD),
    ("https://models.example.com%00.evil.net/models/a.gguf", BAD),
    ("https://models..example.com/models/a.gguf", BAD),
    ("https://-models.example.com/models/a.gguf", BAD),
    ("https://models_x.example.com/models/a.gguf", BAD),
    ("https://*.example.com/models/a.gguf", BAD),
    ("https://xn--zz.example.com/models/a.gguf", BAD),
    # userinfo
    ("https://user@models.example.com/models/a.gguf", DENY),
    ("https://user:pw@models.example.com/models/a.gguf", DENY),
    ("https://models.example.com@evil.net/models/a.gguf", DENY),
    ("https://models.example.com:443@evil.net/models/a.gguf", DENY),
    ("https://@models.example.com/models/a.gguf", DENY),
    # backslashes, whitespace, control characters
    ("https://models.example.com\\@evil.net/models/a.gguf", BAD),
    ("https:\\\\models.example.com\\models\\a.gguf", BAD),
    ("https://models.example.com/models\\..\\a.gguf", BAD),
    (" https://models.example.com/models/a.gguf", BAD),
    ("https://models.example.com/models/a.gguf ", BAD),
    ("https://models.example.com/models/a\tb.gguf", BAD),
    ("https://models.example.com/models/a.gguf\n", BAD),
    ("https://models.example.com/mod\rels/a.gguf", BAD),
    ("https://models.example.com/models/a\x00.gguf", BAD),
    ("https://models.example.com/models/a\x7f.gguf", BAD),
    ("https://models.example.com\u200b/models/a.gguf", BAD),
    ("https://models.example.com/models/a\u00a0.gguf", BAD),
    ("https://models.example.com/models/a\u2028.gguf", BAD),
    ("https://models.example.com/models/é.gguf", BAD),
    # ports
    ("https://models.example.com:8443/models/a.gguf", DENY),
    ("https://models.example.com:80/models/a.gguf", DENY),
    ("https://models.example.com:/models/a.gguf", BAD),
    ("https://models.example.com:0/models/a.gguf", BAD),
    ("https://models.example.com:65536/models/a.gguf", BAD),
    ("https://models.example.com:99999999/models/a.gguf", BAD),
    ("https://models.example.com:+443/models/a.gguf", BAD),
    ("https://models.example.com:-1/models/a.gguf", BAD),
    ("https://models.example.com:44a/models/a.gguf", BAD),
    ("https://models.example.com:443:443/models/a.gguf", BAD),
    # IP literals
    ("https://[::1]/models/a.gguf", DENY),
    ("https://[::1/models/a.gguf", BAD),
    ("https://[fe80::1%25eth0]/models/a.gguf", BAD),
    ("https://[::1]x/models/a.gguf", BAD),
    ("https://[]/models/a.gguf", BAD),
    ("https://[not-an-ip]/models/a.gguf", BAD),
    ("https://127.0.0.1/models/a.gguf", DENY),
    ("https://127.1/models/a.gguf", BAD),
    ("https://0x7f.0.0.1/models/a.gguf", BAD),
    ("https://2130706433/models/a.gguf", BAD),
    ("https://0177.0.0.1/models/a.gguf", BAD),
    ("https://127.0.0.01/models/a.gguf", BAD),
    ("https://256.0.0.1/models/a.gguf", BAD),
    # traversal and encodings
    ("https://models.example.com/models/../secret", DENY),
    ("https://models.example.com/models/a/../../secret", DENY),
    ("https://models.example.com/models/%2e%2e/secret", DENY),
    ("https://models.example.com/models/%2E%2E/secret", DENY),
    ("https://models.example.com/models/.%2e/secret", DENY),
    ("https://models.example.com/models/%2e./secret", DENY),
    ("https://models.example.com/models/a/%2e%2e/%2e%2e/secret", DENY),
    ("https://models.example.com/models/./a.gguf", OK),
    ("https://models.example.com/models/a/../b.gguf", OK),
    ("https://models.example.com/x/../models/a.gguf", OK),
    ("https://models.example.com/../models/a.gguf", OK),
    ("https://models.example.com/%6Dodels/a.gguf", OK),  # %6D is "m": unreserved, decoded
    ("https://models.example.com/models/%252e%252e/secret", OK),  # a literal "%2e%2e" segment
    ("https://models.example.com/models", DENY),  # the prefix is the folder, with its slash
    ("https://models.example.com/modelsX/a.gguf", DENY),
    ("https://models.example.com/Models/a.gguf", DENY),  # paths are case-sensitive
    ("https://models.example.com/models%2fa.gguf", BAD),
    ("https://models.example.com/models/..%2fsecret", BAD),
    ("https://models.example.com/models/..%5csecret", BAD),
    ("https://models.example.com/models/a%00.gguf", BAD),
    ("https://models.example.com/models/a%zz.gguf", BAD),
    ("https://models.example.com/models/a%.gguf", BAD),
    ("https://models.example.com/models/a%2.gguf", BAD),
    ("https://models.example.com/models/<a>.gguf", BAD),
    ("https://models.example.com/models//../../secret", BAD),  # merged slashes differ
    ("https://models.example.com/models//a.gguf", BAD),
    ("https://models.example.com/models/a|b.gguf", BAD),
    # not a str
    (None, BAD),
    (b"https://models.example.com/models/a.gguf", BAD),
    (42, BAD),
    (["https://models.example.com/models/a.gguf"], BAD),
    ("https://models.example.com/models/" + "a" * 9000, BAD),
]


@pytest.mark.parametrize(("url", "expected"), URL_TABLE, ids=[repr(u)[:60] for u, _ in URL_TABLE])
def test_validate_source_url_table(url: object, expected: Reason) -> None:
    verdict = validate_source_url(url, ALLOW)
    assert verdict.reason == expected
    assert verdict.ok is (expected is Reason.OK)


WILDCARD = ["https://*.cdn.hf.co/"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://us.aws.cdn.hf.co/blob", OK),
        ("https://eu.cdn.hf.co/blob?X-Amz-Signature=abc", OK),
        ("https://US.CDN.HF.CO./blob", OK),
        ("https://cdn.hf.co/blob", DENY),  # the bare domain is not a subdomain
        ("https://cdn.hf.co.evil.net/blob", DENY),
        ("https://evilcdn.hf.co/blob", DENY),
        ("https://us.cdn.hf.co.evil.net/blob", DENY),
        ("https://us.cdn.hf.co:8443/blob", DENY),
        ("https://us.cdn.hf.co@evil.net/blob", DENY),
        ("http://us.cdn.hf.co/blob", SCHEME),
    ],
)
def test_wildcard_prefix_matches_on_label_boundary(url: str, expected: Reason) -> None:
    assert validate_source_url(url, WILDCARD).reason == expected


@pytest.mark.parametrize(
    ("url", "allow", "expected"),
    [
        ("https://[::1]:8443/m.gguf", ["https://[0:0::1]:8443/"], OK),
        ("https://[0::1]:8443/m.gguf", ["https://[::1]:8443/"], OK),
        ("https://[::1]:8444/m.gguf", ["https://[::1]:8443/"], DENY),
        ("https://[::2]:8443/m.gguf", ["https://[::1]:8443/"], DENY),
        ("https://127.0.0.1:8443/m.gguf", ["https://127.0.0.1:8443/"], OK),
        ("https://127.0.0.1/m.gguf", ["https://127.0.0.1:443/"], OK),
        ("https://huggingface.co/Qwen/R/resolve/abc/f.gguf", ["https://huggingface.co/Qwen/R"], OK),
        ("https://huggingface.co/Qwen/R", ["https://huggingface.co/Qwen/R"], OK),
        ("https://huggingface.co/Qwen/Rx/f.gguf", ["https://huggingface.co/Qwen/R"], DENY),
        ("https://b.example/x", ["https://a.example/", "https://b.example/"], OK),
        ("https://a.example/x", ["https://a.example/", "http://b.example/"], BAD),
        ("https://a.example/x", "https://a.example/", BAD),  # a str is not a list of prefixes
        ("https://a.example/x", [None], BAD),
        ("https://a.example/x", [b"https://a.example/"], BAD),
        ("https://a.example/x", ["https://a.example/?q=1"], BAD),
        ("https://a.example/x", ["https://a.example/#f"], BAD),
        ("https://a.example/x", ["https://u@a.example/"], BAD),
        ("https://a.example/x", ["https://*.example/"], BAD),  # a whole top-level domain
        ("https://a.b.example/x", ["https://a.*.example/"], BAD),
        ("https://a.b.example/x", ["https://*.*.example/"], BAD),
        ("https://a.example/x", ["https://*.127.0.0.1/"], BAD),
        ("https://a.example/x", [], DENY),
        ("https://a.example/x", (), DENY),
        ("https://a.example/x", None, BAD),
        ("https://a.example/x", {"https://a.example/"}, BAD),
    ],
)
def test_allowlist_forms(url: str, allow: object, expected: Reason) -> None:
    assert validate_source_url(url, allow).reason == expected


DIGEST = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize(
    ("digest", "size", "ok"),
    [
        (DIGEST, 1, True),
        (DIGEST.upper(), 1, True),
        (DIGEST, MAX_MODEL_SIZE_BYTES, True),
        (DIGEST, MAX_MODEL_SIZE_BYTES + 1, False),
        (DIGEST, 0, False),
        (DIGEST, -1, False),
        (DIGEST, True, False),
        (DIGEST, 1.0, False),
        (DIGEST, math.nan, False),
        (DIGEST, math.inf, False),
        (DIGEST, "10", False),
        (DIGEST, None, False),
        (DIGEST[:-1], 1, False),
        (DIGEST + "0", 1, False),
        ("g" + DIGEST[1:], 1, False),
        (" " + DIGEST[1:], 1, False),
        (DIGEST + "\n", 1, False),
        ("sha256:" + DIGEST, 1, False),
        (DIGEST.encode(), 1, False),
        ("", 1, False),
        (None, 1, False),
        ("\uff10" * 64, 1, False),  # full-width digits are not hex
    ],
)
def test_validate_integrity_spec_table(digest: object, size: object, ok: bool) -> None:
    verdict = validate_integrity_spec(digest, size)
    assert verdict.ok is ok
    assert verdict.reason == (Reason.OK if ok else Reason.MALFORMED_SPEC)


def test_normalize_sha256_lowercases() -> None:
    assert normalize_sha256(DIGEST.upper()) == DIGEST
    assert normalize_sha256("nope") is None


# -- accumulator -------------------------------------------------------------------------------

DATA = bytes(range(256)) * 5
DATA_DIGEST = hashlib.sha256(DATA).hexdigest()
SRC = "https://models.example.com/models/m.gguf"


def accumulator() -> object:
    return create_integrity_accumulator(
        expected_digest=DATA_DIGEST.upper(),
        expected_size_bytes=len(DATA),
        source_url=SRC,
        allowed_source_urls=ALLOW,
    )


def test_accumulator_accepts_bytes_like_chunks_and_refuses_str() -> None:
    acc = create_integrity_accumulator(
        expected_digest=DATA_DIGEST,
        expected_size_bytes=len(DATA),
        source_url=SRC,
        allowed_source_urls=ALLOW,
    )
    assert acc.update(DATA[:10]).ok
    assert acc.update(bytearray(DATA[10:20])).ok
    assert acc.update(memoryview(DATA)[20:]).ok
    with pytest.raises(TypeError):
        acc.update("text")  # type: ignore[arg-type]
    assert acc.finalize().ok


def test_accumulator_accepts_multidimensional_memoryview() -> None:
    acc = create_integrity_accumulator(
        expected_digest=DATA_DIGEST,
        expected_size_bytes=len(DATA),
        source_url=SRC,
        allowed_source_urls=ALLOW,
    )
    acc.update(memoryview(DATA).cast("B", (len(DATA) // 4, 4)))
    assert acc.bytes_seen == len(DATA)
    assert acc.finalize().ok


def test_accumulator_reports_overflow_at_once_and_never_recovers() -> None:
    acc = create_integrity_accumulator(
        expected_digest=DATA_DIGEST,
        expected_size_bytes=len(DATA),
        source_url=SRC,
        allowed_source_urls=ALLOW,
    )
    assert acc.update(DATA).ok
    over = acc.update(b"!")
    assert (over.ok, over.reason) == (False, Reason.SIZE_MISMATCH)
    assert acc.finalize().reason == Reason.SIZE_MISMATCH


def test_accumulator_after_finalize_more_bytes_never_ok() -> None:
    acc = create_integrity_accumulator(
        expected_digest=DATA_DIGEST,
        expected_size_bytes=len(DATA),
        source_url=SRC,
        allowed_source_urls=ALLOW,
    )
    acc.update(DATA[:100])
    assert acc.finalize().reason == Reason.SIZE_MISMATCH
    assert not acc.update(DATA[100:]).ok
    assert not acc.finalize().ok


def test_accumulator_finalized_ok_then_more_bytes_fails() -> None:
    acc = create_integrity_accumulator(
        expected_digest=DATA_DIGEST,
        expected_size_bytes=len(DATA),
        source_url=SRC,
        allowed_source_urls=ALLOW,
    )
    acc.update(DATA)
    assert acc.finalize().ok
    assert not acc.update(b"").ok
    assert not acc.finalize().ok


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"expected_digest": "0" * 63}, Reason.MALFORMED_SPEC),
        ({"expected_size_bytes": 0}, Reason.MALFORMED_SPEC),
        ({"source_url": "http://models.example.com/models/m.gguf"}, Reason.SCHEME_NOT_ALLOWED),
        ({"source_url": "https://evil.net/models/m.gguf"}, Reason.SOURCE_NOT_ALLOWED),
        ({"allowed_source_urls": []}, Reason.SOURCE_NOT_ALLOWED),
        ({"allowed_source_urls": "https://models.example.com/"}, Reason.MALFORMED_INPUT),
    ],
)
def test_accumulator_constructor_refusals_are_type_and_value_errors(
    overrides: dict[str, object], reason: Reason
) -> None:
    params: dict[str, object] = {
        "expected_digest": DATA_DIGEST,
        "expected_size_bytes": len(DATA),
        "source_url": SRC,
        "allowed_source_urls": ALLOW,
    }
    params.update(overrides)
    with pytest.raises(IntegritySpecError) as info:
        create_integrity_accumulator(**params)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, ValueError)
    assert info.value.reason == reason
    message = str(info.value)
    for secret in (DATA_DIGEST, "models.example.com", "evil.net", "https://", "http://"):
        assert secret not in message


def test_verify_model_bytes_refuses_non_bytes() -> None:
    for junk in ("text", None, 1, [1, 2]):
        verdict = verify_model_bytes(
            file_data=junk,
            expected_digest=DATA_DIGEST,
            expected_size_bytes=len(DATA),
            source_url=SRC,
            allowed_source_urls=ALLOW,
        )
        assert (verdict.ok, verdict.reason) == (False, Reason.MALFORMED_INPUT)


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(DATA)), max_size=12))
def test_accumulator_accepts_exactly_the_right_bytes_under_any_chunking(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(DATA)]
    acc = create_integrity_accumulator(
        expected_digest=DATA_DIGEST,
        expected_size_bytes=len(DATA),
        source_url=SRC,
        allowed_source_urls=ALLOW,
    )
    for start, end in itertools.pairwise(bounds):
        assert acc.update(DATA[start:end]).ok
    assert acc.finalize().ok


@settings(max_examples=300, deadline=None)
@given(
    other=st.binary(max_size=len(DATA) + 8),
    cuts=st.lists(st.integers(min_value=0, max_value=len(DATA) + 8), max_size=8),
)
def test_accumulator_refuses_any_other_bytes(other: bytes, cuts: list[int]) -> None:
    if other == DATA:
        return
    bounds = [0, *sorted(c for c in cuts if c <= len(other)), len(other)]
    acc = create_integrity_accumulator(
        expected_digest=DATA_DIGEST,
        expected_size_bytes=len(DATA),
        source_url=SRC,
        allowed_source_urls=ALLOW,
    )
    for start, end in itertools.pairwise(bounds):
        acc.update(other[start:end])
    verdict = acc.finalize()
    assert verdict.ok is False
    expected = Reason.SIZE_MISMATCH if len(other) != len(DATA) else Reason.DIGEST_MISMATCH
    assert verdict.reason == expected


@settings(max_examples=50, deadline=None)
@given(mutation=st.tuples(st.integers(0, len(DATA) - 1), st.integers(1, 255)))
def test_accumulator_refuses_any_single_byte_change(mutation: tuple[int, int]) -> None:
    index, flip = mutation
    corrupted = bytearray(DATA)
    corrupted[index] ^= flip
    verdict = verify_model_bytes(
        file_data=corrupted,
        expected_digest=DATA_DIGEST,
        expected_size_bytes=len(DATA),
        source_url=SRC,
        allowed_source_urls=ALLOW,
    )
    assert verdict.reason == Reason.DIGEST_MISMATCH


# -- properties: no validator or evaluator raises or admits for junk ---------------------------

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
    st.binary(max_size=40),
    st.lists(st.text(max_size=20), max_size=3),
    st.dictionaries(st.text(max_size=10), st.integers(), max_size=3),
)
junk_number = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.floats(max_value=-1e-9),
    st.integers(max_value=-1),
    st.text(max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(url=junk, allow=junk)
def test_validate_source_url_never_raises_or_admits_junk(url: object, allow: object) -> None:
    verdict = validate_source_url(url, allow)
    assert verdict.ok is False
    assert verdict.reason in set(Reason)


@settings(max_examples=300, deadline=None)
@given(digest=junk, size=junk)
def test_validate_integrity_spec_never_raises_for_junk(digest: object, size: object) -> None:
    verdict = validate_integrity_spec(digest, size)
    assert verdict.ok is False
    assert verdict.reason == Reason.MALFORMED_SPEC


@settings(max_examples=300, deadline=None)
@given(
    lifecycle=st.one_of(junk, st.sampled_from(list(LifecycleState)).map(create_lifecycle_state)),
    admission=junk,
    ram=junk_number,
    vram=junk_number,
    cpu=junk_number,
    positional=junk,
)
def test_evaluate_functions_never_raise_or_admit_junk(
    lifecycle: object, admission: object, ram: object, vram: object, cpu: object, positional: object
) -> None:
    observation = ResourceObservation(ram, vram, cpu)  # type: ignore[arg-type]
    limits = create_resource_limits(max_ram_bytes=1e9, max_vram_bytes=1e9, max_cpu_percent=50)
    assert evaluate_resource_limits(observation, limits).ok is False
    assert evaluate_admission(admission).ok is False
    verdict = evaluate_runtime_request(
        lifecycle=lifecycle, admission=admission, observation=observation, limits=limits
    )
    assert verdict.ok is False
    assert evaluate_runtime_request(positional).ok is False
    assert transition_lifecycle(lifecycle, positional).ok is False
    assert can_serve_inference(positional) is False


@settings(max_examples=200, deadline=None)
@given(event=junk, state=junk)
def test_transition_lifecycle_never_raises_for_junk(event: object, state: object) -> None:
    result = transition_lifecycle(state, event)
    assert (result.ok, result.reason, result.lifecycle) == (False, Reason.MALFORMED_INPUT, None)


# -- property: what the validator admits, httpx reads the same way -----------------------------

segment = st.sampled_from(
    ["models", "a.gguf", ".", "..", "%2e", "%2E%2e", ".%2e", "%2e.", "x", "%6Dodels", "", "%41"]
)
host = st.sampled_from(
    [
        "models.example.com",
        "MODELS.example.com",
        "models.example.com.",
        "models.example.com:443",
        "models.example.com:8443",
        "evil.net",
        "models.example.com@evil.net",
        "evil.net@models.example.com",
        "models.example.com.evil.net",
        "[::1]",
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    scheme=st.sampled_from(["https", "HTTPS", "http"]),
    host=host,
    segments=st.lists(segment, max_size=6),
    query=st.sampled_from(["", "?a=/../..", "#/../x"]),
)
def test_admitted_urls_mean_the_same_to_httpx(
    scheme: str, host: str, segments: list[str], query: str
) -> None:
    url = f"{scheme}://{host}/" + "/".join(segments) + query
    if not validate_source_url(url, ALLOW).ok:
        return
    parsed = httpx.URL(url)
    assert parsed.scheme == "https"
    assert parsed.host.rstrip(".") == "models.example.com"  # a trailing dot is the same name
    assert parsed.port in (None, 443)
    assert parsed.userinfo == b""
    # What a server that decodes escapes and resolves dot segments would serve.
    served = posixpath.normpath(urllib.parse.unquote(parsed.path))
    assert served == "/models" or served.startswith("/models/")


# -- lifecycle ---------------------------------------------------------------------------------

S, E = LifecycleState, LifecycleEvent
ALLOWED_TRANSITIONS = {
    (S.STOPPED, E.START): S.STARTING,
    (S.STARTING, E.HEALTH_OK): S.READY,
    (S.STARTING, E.HEALTH_FAIL): S.STOPPED,
    (S.STARTING, E.CRASH): S.STOPPED,
    (S.STARTING, E.ABORT): S.STOPPED,
    (S.READY, E.HEALTH_OK): S.READY,
    (S.READY, E.HEALTH_FAIL): S.STOPPED,
    (S.READY, E.CRASH): S.STOPPED,
    (S.READY, E.DRAIN): S.DRAINING,
    (S.DRAINING, E.HEALTH_OK): S.DRAINING,
    (S.DRAINING, E.HEALTH_FAIL): S.STOPPED,
    (S.DRAINING, E.CRASH): S.STOPPED,
    (S.DRAINING, E.STOPPED): S.STOPPED,
}


@pytest.mark.parametrize("state", list(LifecycleState))
@pytest.mark.parametrize("event", list(LifecycleEvent))
def test_transition_table_is_exactly_this(state: LifecycleState, event: LifecycleEvent) -> None:
    result = transition_lifecycle(create_lifecycle_state(state), event)
    target = ALLOWED_TRANSITIONS.get((state, event))
    if target is None:
        assert (result.ok, result.reason, result.lifecycle) == (
            False,
            Reason.INVALID_TRANSITION,
            None,
        )
    else:
        assert result.ok
        assert result.reason == Reason.OK
        assert result.lifecycle == create_lifecycle_state(target)


def test_ready_is_reachable_only_from_starting_with_health_ok() -> None:
    into_ready = {key for key, target in ALLOWED_TRANSITIONS.items() if target is S.READY}
    assert into_ready == {(S.STARTING, E.HEALTH_OK), (S.READY, E.HEALTH_OK)}


def test_lifecycle_constructor_checks_state() -> None:
    with pytest.raises(TypeError, match="state must be a LifecycleState"):
        create_lifecycle_state("ready")  # type: ignore[arg-type]


def test_runtime_request_reports_draining_apart_from_not_ready() -> None:
    common = {
        "admission": create_admission_state(max_in_flight=1, queue_bound=0),
        "observation": ResourceObservation(),
        "limits": ResourceLimits(),
    }
    draining = create_lifecycle_state(LifecycleState.DRAINING)
    assert evaluate_runtime_request(lifecycle=draining, **common).reason == Reason.DRAINING
    starting = create_lifecycle_state(LifecycleState.STARTING)
    assert evaluate_runtime_request(lifecycle=starting, **common).reason == Reason.NOT_READY
    ready = create_lifecycle_state(LifecycleState.READY)
    assert evaluate_runtime_request(lifecycle=ready, **common).ok


def test_runtime_request_mapping_form_and_misuse() -> None:
    ready = create_lifecycle_state(LifecycleState.READY)
    parts = {
        "lifecycle": ready,
        "admission": create_admission_state(max_in_flight=1, queue_bound=0),
        "observation": ResourceObservation(),
        "limits": ResourceLimits(),
    }
    assert evaluate_runtime_request(parts).ok
    assert evaluate_runtime_request({**parts, "extra": 1}).reason == Reason.MALFORMED_INPUT
    assert evaluate_runtime_request(parts, lifecycle=ready).reason == Reason.MALFORMED_INPUT
    for missing in ("admission", "observation", "limits"):
        partial = {k: v for k, v in parts.items() if k != missing}
        assert evaluate_runtime_request(partial).ok is False


# -- admission ---------------------------------------------------------------------------------


def test_admission_counters_round_trip_and_refuse_misuse() -> None:
    state = create_admission_state(max_in_flight=2, queue_bound=1)
    state = record_in_flight(record_in_flight(state))
    with pytest.raises(ValueError, match="exceed max_in_flight"):
        record_in_flight(state)
    assert evaluate_admission(state).reason == Reason.AT_CAPACITY
    state = record_queued(state)
    assert evaluate_admission(state).reason == Reason.QUEUE_FULL
    with pytest.raises(ValueError, match="exceed queue_bound"):
        record_queued(state)
    state = record_released(record_dequeued(state))
    assert evaluate_admission(state).ok
    state = record_released(state)
    with pytest.raises(ValueError, match="no request in flight"):
        record_released(state)
    with pytest.raises(ValueError, match="no request queued"):
        record_dequeued(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_in_flight": 0, "queue_bound": 1}, "max_in_flight must be a positive int"),
        ({"max_in_flight": True, "queue_bound": 1}, "max_in_flight must be a positive int"),
        ({"max_in_flight": 1.0, "queue_bound": 1}, "max_in_flight must be a positive int"),
        ({"max_in_flight": 1, "queue_bound": -1}, "queue_bound must be a non-negative int"),
        ({"max_in_flight": 1, "queue_bound": None}, "queue_bound must be a non-negative int"),
    ],
)
def test_admission_constructor_checks(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_admission_state(**kwargs)  # type: ignore[arg-type]


def test_admission_replace_is_checked_too() -> None:
    state = create_admission_state(max_in_flight=2, queue_bound=3)
    with pytest.raises(ValueError, match="queued"):
        dataclasses.replace(state, queued=4)
    with pytest.raises(ValueError, match="in_flight"):
        dataclasses.replace(state, in_flight=-1)


# -- resources ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("observation", "reason"),
    [
        (ResourceObservation(1, 1, 1), Reason.OK),
        (ResourceObservation(10, 10, 10), Reason.OK),  # equal to the limit is within it
        (ResourceObservation(11, 11, 11), Reason.RAM_OVER_LIMIT),
        (ResourceObservation(1, 11, 11), Reason.VRAM_OVER_LIMIT),
        (ResourceObservation(1, 1, 10.5), Reason.CPU_OVER_LIMIT),
        (ResourceObservation(None, 1, 1), Reason.RESOURCE_NOT_OBSERVED),
        (ResourceObservation(1, None, 1), Reason.RESOURCE_NOT_OBSERVED),
        (ResourceObservation(math.nan, 1, 1), Reason.MALFORMED_INPUT),
        (ResourceObservation(1, math.inf, 1), Reason.MALFORMED_INPUT),
        (ResourceObservation(1, 1, -1), Reason.MALFORMED_INPUT),
        (ResourceObservation(True, 1, 1), Reason.MALFORMED_INPUT),
    ],
)
def test_resource_limits_table(observation: ResourceObservation, reason: Reason) -> None:
    limits = create_resource_limits(max_ram_bytes=10, max_vram_bytes=10, max_cpu_percent=10)
    assert evaluate_resource_limits(observation, limits).reason == reason


def test_unset_limit_ignores_unobserved_value() -> None:
    limits = create_resource_limits(max_ram_bytes=10)
    assert evaluate_resource_limits(ResourceObservation(5, None, None), limits).ok
    assert evaluate_resource_limits(ResourceObservation(None, None, None), ResourceLimits()).ok


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, True, "1"])
def test_resource_limits_constructor_checks(bad: object) -> None:
    with pytest.raises(ValueError, match="max_ram_bytes must be a positive finite number"):
        create_resource_limits(max_ram_bytes=bad)  # type: ignore[arg-type]
