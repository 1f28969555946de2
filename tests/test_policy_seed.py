"""A port of the user's security spec (shared/seed/000_61e4e7fa65644673.txt, tier 7).

One Python test per JavaScript ``it``, parametrised where the seed loops, with the same assertions
and the same thresholds. The seed's ``{ state: READY }`` literals become ``create_lifecycle_state``,
``{ ...admission, queued: MAX_Q }`` becomes ``dataclasses.replace`` and its observation literals
become ``ResourceObservation``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable

import pytest

import supervisor.policy as policy_module
from supervisor.policy import (
    LifecycleEvent,
    LifecycleState,
    Reason,
    ResourceObservation,
    Verdict,
    can_serve_inference,
    create_admission_state,
    create_integrity_accumulator,
    create_lifecycle_state,
    create_resource_limits,
    evaluate_admission,
    evaluate_resource_limits,
    evaluate_runtime_request,
    record_in_flight,
    transition_lifecycle,
    validate_integrity_spec,
    validate_source_url,
    verify_model_bytes,
)


def make_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


ALLOWED_URLS = ["https://models.example.com/"]
VALID_URL = "https://models.example.com/model.bin"
VALID_DATA = b"a legitimate model binary payload"
VALID_DIGEST = make_digest(VALID_DATA)
VALID_SIZE = len(VALID_DATA)
READY = create_lifecycle_state(LifecycleState.READY)
VALID_LIMITS = create_resource_limits(max_ram_bytes=8e9, max_vram_bytes=4e9, max_cpu_percent=80)
VALID_OBS = ResourceObservation(ram_bytes=1e9, vram_bytes=0.5e9, cpu_percent=10)


def new_accumulator(**overrides: object) -> policy_module.IntegrityAccumulator:
    params: dict[str, object] = {
        "expected_digest": VALID_DIGEST,
        "expected_size_bytes": VALID_SIZE,
        "source_url": VALID_URL,
        "allowed_source_urls": ALLOWED_URLS,
    }
    params.update(overrides)
    return create_integrity_accumulator(**params)


# -- (a) supply-chain integrity --------------------------------------------------------------


class TestSupplyChainWrongDigestRejectsModelBeforeExecution:
    def test_wrong_digest_all_zeros_is_rejected_digest_mismatch(self) -> None:
        r = verify_model_bytes(
            file_data=VALID_DATA,
            expected_digest="0" * 64,
            expected_size_bytes=VALID_SIZE,
            source_url=VALID_URL,
            allowed_source_urls=ALLOWED_URLS,
        )
        assert r.ok is False
        assert r.reason == Reason.DIGEST_MISMATCH

    def test_wrong_digest_one_hex_char_flipped_is_rejected(self) -> None:
        flipped = VALID_DIGEST[:-1] + ("1" if VALID_DIGEST.endswith("0") else "0")
        r = verify_model_bytes(
            file_data=VALID_DATA,
            expected_digest=flipped,
            expected_size_bytes=VALID_SIZE,
            source_url=VALID_URL,
            allowed_source_urls=ALLOWED_URLS,
        )
        assert r.ok is False
        assert r.reason == Reason.DIGEST_MISMATCH

    def test_missing_digest_empty_string_spec_is_rejected_before_download_starts(self) -> None:
        r = validate_integrity_spec("", VALID_SIZE)
        assert r.ok is False
        assert r.reason == Reason.MALFORMED_SPEC

    def test_missing_digest_null_is_rejected(self) -> None:
        r = validate_integrity_spec(None, VALID_SIZE)
        assert r.ok is False

    def test_accumulator_digest_mismatch_from_correct_length_corrupted_data(self) -> None:
        acc = new_accumulator()
        corrupted = bytearray(VALID_DATA)
        corrupted[0] ^= 0x01  # flip one bit
        acc.update(corrupted)
        verdict = acc.finalize()
        assert verdict.ok is False
        assert verdict.reason == Reason.DIGEST_MISMATCH

    def test_accumulator_size_mismatch_one_extra_byte_appended(self) -> None:
        acc = new_accumulator()
        acc.update(VALID_DATA)
        acc.update(bytes([0x00]))  # one extra byte
        verdict = acc.finalize()
        assert verdict.ok is False
        assert verdict.reason == Reason.SIZE_MISMATCH

    def test_accumulator_oversized_download_rejected_when_more_arrives(self) -> None:
        # An attacker delivers more bytes than declared: size mismatch.
        acc = new_accumulator(expected_size_bytes=VALID_SIZE)
        acc.update(VALID_DATA)
        acc.update(b"\x42" * 1000)  # extra bytes from the attacker
        verdict = acc.finalize()
        assert verdict.ok is False
        assert verdict.reason == Reason.SIZE_MISMATCH

    def test_http_source_url_is_rejected_at_spec_validation_time(self) -> None:
        r = validate_source_url("http://models.example.com/model.bin", ALLOWED_URLS)
        assert r.ok is False
        assert r.reason == Reason.SCHEME_NOT_ALLOWED

    def test_foreign_source_url_not_in_allowlist_is_rejected(self) -> None:
        r = validate_source_url("https://evil-models.net/model.bin", ALLOWED_URLS)
        assert r.ok is False
        assert r.reason == Reason.SOURCE_NOT_ALLOWED

    def test_empty_allowlist_rejects_any_url_fail_closed(self) -> None:
        r = validate_source_url(VALID_URL, [])
        assert r.ok is False
        assert r.reason == Reason.SOURCE_NOT_ALLOWED

    def test_accumulator_throws_when_constructed_with_http_source_url(self) -> None:
        with pytest.raises(TypeError) as info:
            new_accumulator(source_url="http://models.example.com/model.bin")
        # The message must not contain the URL or the digest (no secret leak).
        assert "http://models.example.com" not in str(info.value), "URL leaked in error"

    def test_accumulator_throws_when_constructed_with_foreign_source_url(self) -> None:
        with pytest.raises(TypeError) as info:
            new_accumulator(source_url="https://evil-models.net/model.bin")
        assert "evil-models.net" not in str(info.value), "URL leaked in error"


# -- (a) supply-chain: no execution on unverified bytes ----------------------------------------


class TestNoExecutionPathWithoutIntegrityPassing:
    def test_lifecycle_gate_can_only_reach_ready_via_health_ok_after_start(self) -> None:
        # There is no direct stopped -> ready transition.
        r = transition_lifecycle(create_lifecycle_state(), LifecycleEvent.HEALTH_OK)
        assert r.ok is False
        # starting -> ready requires health_ok, not any other event.
        s = create_lifecycle_state(LifecycleState.STARTING)
        assert transition_lifecycle(s, LifecycleEvent.DRAIN).ok is False
        assert transition_lifecycle(s, LifecycleEvent.STOPPED).ok is False
        assert transition_lifecycle(s, LifecycleEvent.START).ok is False

    def test_can_serve_inference_is_false_in_all_non_ready_states(self) -> None:
        assert can_serve_inference(create_lifecycle_state(LifecycleState.STOPPED)) is False
        assert can_serve_inference(create_lifecycle_state(LifecycleState.STARTING)) is False
        assert can_serve_inference(create_lifecycle_state(LifecycleState.DRAINING)) is False
        assert can_serve_inference(create_lifecycle_state(LifecycleState.READY)) is True


# -- (b) resource exhaustion: backpressure -----------------------------------------------------


class TestBackpressureFloodHitsBound:
    def test_backpressure_trips_at_exact_max_in_flight_boundary_100_requests(self) -> None:
        maximum = 100
        admission = create_admission_state(max_in_flight=maximum, queue_bound=50)
        for _ in range(maximum):
            admission = record_in_flight(admission)
        # Exactly at the boundary: the next request is AT_CAPACITY.
        r = evaluate_admission(admission)
        assert r.ok is False
        assert r.reason == Reason.AT_CAPACITY
        assert admission.in_flight == maximum  # exact count, no overflow

    def test_queue_full_trips_at_exact_queue_bound(self) -> None:
        max_f, max_q = 2, 5
        admission = create_admission_state(max_in_flight=max_f, queue_bound=max_q)
        for _ in range(max_f):
            admission = record_in_flight(admission)
        admission = dataclasses.replace(admission, queued=max_q)
        r = evaluate_admission(admission)
        assert r.ok is False
        assert r.reason == Reason.QUEUE_FULL

    def test_evaluate_runtime_request_blocks_when_not_ready_flood_cannot_bypass(self) -> None:
        flood_admission = create_admission_state(max_in_flight=1000, queue_bound=1000)
        stopped = create_lifecycle_state()
        # Even with unlimited admission capacity, the lifecycle blocks all.
        for _ in range(1000):
            r = evaluate_runtime_request(
                lifecycle=stopped,
                admission=flood_admission,
                observation=VALID_OBS,
                limits=VALID_LIMITS,
            )
            assert r.ok is False
            assert r.reason == Reason.NOT_READY


# -- (b) resource exhaustion: over-limit rejection ---------------------------------------------


class TestResourceLimitsPreventOom:
    def _evaluate(self, obs: ResourceObservation) -> Verdict:
        return evaluate_runtime_request(
            lifecycle=READY,
            admission=create_admission_state(max_in_flight=10, queue_bound=20),
            observation=obs,
            limits=VALID_LIMITS,
        )

    def test_ram_over_limit_rejected_before_inference(self) -> None:
        assert VALID_LIMITS.max_ram_bytes is not None
        obs = dataclasses.replace(VALID_OBS, ram_bytes=VALID_LIMITS.max_ram_bytes + 1)
        r = self._evaluate(obs)
        assert r.ok is False
        assert r.reason == Reason.RAM_OVER_LIMIT

    def test_vram_over_limit_rejected_before_inference(self) -> None:
        assert VALID_LIMITS.max_vram_bytes is not None
        obs = dataclasses.replace(VALID_OBS, vram_bytes=VALID_LIMITS.max_vram_bytes + 1)
        r = self._evaluate(obs)
        assert r.ok is False
        assert r.reason == Reason.VRAM_OVER_LIMIT

    def test_cpu_over_limit_rejected_before_inference(self) -> None:
        assert VALID_LIMITS.max_cpu_percent is not None
        obs = dataclasses.replace(VALID_OBS, cpu_percent=VALID_LIMITS.max_cpu_percent + 1)
        r = self._evaluate(obs)
        assert r.ok is False
        assert r.reason == Reason.CPU_OVER_LIMIT


# -- (c) ambient authority ---------------------------------------------------------------------


class TestNoAmbientAuthorityInModuleExports:
    def test_module_exports_include_no_vault_keychain_canister_or_jwt_accessor(self) -> None:
        forbidden = ["vault", "keychain", "jwt", "token", "canister", "session", "auth", "secret"]
        for key in policy_module.__all__:
            for bad in forbidden:
                assert bad not in key.lower(), (
                    f'Export "{key}" looks like it exposes a sensitive authority (contains "{bad}")'
                )

    def test_evaluate_runtime_request_returns_ok_and_reason_only(self) -> None:
        r = evaluate_runtime_request(
            lifecycle=READY,
            admission=create_admission_state(max_in_flight=4, queue_bound=8),
            observation=VALID_OBS,
            limits=VALID_LIMITS,
        )
        # Exactly ok and reason; no extra fields carrying data.
        keys = [field.name for field in dataclasses.fields(r)]
        assert sorted(keys) == sorted(["ok", "reason"])
        assert isinstance(r.ok, bool)
        assert isinstance(r.reason, str)


# -- (c) no secret in reason strings -----------------------------------------------------------

SECRET_PATTERNS = [
    VALID_URL,
    VALID_DIGEST,
    "models.example.com",
    "https://",
    "http://",
    "/model.bin",
]


def assert_no_secret_in_reason(r: Verdict, label: str) -> None:
    for pattern in SECRET_PATTERNS:
        assert pattern not in r.reason, (
            f'Reason "{r.reason}" contains secret pattern "{pattern}" in test: {label}'
        )


class TestNoSecretInReasonStrings:
    def test_validate_source_url_failure_reasons_contain_no_url(self) -> None:
        assert_no_secret_in_reason(
            validate_source_url("http://models.example.com/m", ALLOWED_URLS), "http src"
        )
        assert_no_secret_in_reason(
            validate_source_url("https://evil.net/m", ALLOWED_URLS), "foreign src"
        )
        assert_no_secret_in_reason(validate_source_url("bad url", ALLOWED_URLS), "bad url")

    def test_verify_model_bytes_failure_reasons_contain_no_digest_or_url(self) -> None:
        assert_no_secret_in_reason(
            verify_model_bytes(
                file_data=VALID_DATA,
                expected_digest="0" * 64,
                expected_size_bytes=VALID_SIZE,
                source_url=VALID_URL,
                allowed_source_urls=ALLOWED_URLS,
            ),
            "wrong digest",
        )
        assert_no_secret_in_reason(
            verify_model_bytes(
                file_data=VALID_DATA,
                expected_digest=VALID_DIGEST,
                expected_size_bytes=VALID_SIZE + 1,
                source_url=VALID_URL,
                allowed_source_urls=ALLOWED_URLS,
            ),
            "size mismatch",
        )

    def test_evaluate_runtime_request_failure_reasons_contain_no_observation_values(
        self,
    ) -> None:
        assert VALID_LIMITS.max_ram_bytes is not None
        obs = dataclasses.replace(VALID_OBS, ram_bytes=VALID_LIMITS.max_ram_bytes + 1)
        r = evaluate_runtime_request(
            lifecycle=READY,
            admission=create_admission_state(max_in_flight=4, queue_bound=8),
            observation=obs,
            limits=VALID_LIMITS,
        )
        # The reason must not contain numeric values from the observation.
        assert str(obs.ram_bytes) not in r.reason, "ram_bytes leaked in reason"
        assert str(int(obs.ram_bytes or 0)) not in r.reason, "ram_bytes leaked in reason"

    def test_accumulator_finalize_failure_reasons_are_fixed_constants(self) -> None:
        acc = new_accumulator()
        acc.update(b"x" * VALID_SIZE)  # wrong content
        verdict = acc.finalize()
        assert_no_secret_in_reason(verdict, "digest mismatch")


# -- (d) constant-time digest comparison -------------------------------------------------------


class TestConstantTimeDigestComparison:
    def test_timing_is_not_correlated_with_prefix_match_length_statistical_bound(self) -> None:
        # The seed's own coarse check, ported as it is: all-zeros wrong digest against a digest
        # whose first 60 characters match. A true timing oracle would be 10-100x; allow 5x.
        n = 100
        prefix_wrong = VALID_DIGEST[:60] + "0000"
        all_wrong = "0" * 64

        def time_verify(digest: str) -> float:
            start = time.perf_counter()
            for _ in range(n):
                verify_model_bytes(
                    file_data=VALID_DATA,
                    expected_digest=digest,
                    expected_size_bytes=VALID_SIZE,
                    source_url=VALID_URL,
                    allowed_source_urls=ALLOWED_URLS,
                )
            return (time.perf_counter() - start) * 1000.0

        t_all = time_verify(all_wrong)
        t_prefix = time_verify(prefix_wrong)
        ratio = max(t_all, t_prefix) / min(t_all, t_prefix)
        assert ratio < 5, (
            f"Timing ratio {ratio:.2f} suggests timing oracle. "
            f"tAll={t_all:.2f}ms tPrefix={t_prefix:.2f}ms"
        )


# -- (c) fail-closed posture -------------------------------------------------------------------

NULL_INPUT_CASES: list[tuple[str, Callable[[], object]]] = [
    ("null params", lambda: evaluate_runtime_request(None)),
    ("empty params", lambda: evaluate_runtime_request({})),
    (
        "all null fields",
        lambda: evaluate_runtime_request(
            lifecycle=None, admission=None, observation=None, limits=None
        ),
    ),
    ("null admission", lambda: evaluate_admission(None)),
    ("undefined admission", lambda: evaluate_admission(object())),
    ("null observation", lambda: evaluate_resource_limits(None, VALID_LIMITS)),
    ("null limits", lambda: evaluate_resource_limits(VALID_OBS, None)),
    ("null lifecycle state", lambda: transition_lifecycle(None, LifecycleEvent.START)),
]


class TestGlobalFailClosedPosture:
    @pytest.mark.parametrize(
        ("label", "fn"), NULL_INPUT_CASES, ids=[c[0] for c in NULL_INPUT_CASES]
    )
    def test_null_input_denies(self, label: str, fn: Callable[[], object]) -> None:
        r = fn()
        assert getattr(r, "ok") is False, f"expected ok:false for: {label}"  # noqa: B009

    def test_evaluate_runtime_request_never_throws_on_any_input(self) -> None:
        throwing_inputs: list[object] = [None, "string", 42, [], lambda: None, object()]
        for inp in throwing_inputs:
            r = evaluate_runtime_request(inp)
            assert r.ok is False, f"admitted input: {inp!r}"
