"""CUDA handoff of encoder results to the consuming stream (skipped without a GPU).

The scheduler consumes results on its own (forward) stream while the encoder produced them on
another: the async service ties each result to the consumer with ``record_stream``, the lockstep
encoder makes the consumer wait on an event. Both must deliver correct values while the consumer
stream is busy and the producer's memory is recycled.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mm_scheduler_sglang.adapters import SGLangTower
from mm_scheduler_sglang.service import EncoderService

from mm_scheduler import CoalescerConfig, EncodeItem
from mm_scheduler.lockstep import LockstepEncoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class SlowCudaTower(SGLangTower):
    """Per unit: a long matmul chain, then a value the test can predict (2 * pixel sum)."""

    ragged = True
    bytes_per_patch = 4096

    def __init__(self) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.model = torch.nn.Linear(1, 1).to(self.device)

    def _raw_pixels(self, item, shape=None) -> bool:
        return True

    def output_tokens(self, item) -> int:
        return item.feature.shape[0]

    def output_bytes(self, item) -> int:
        return item.feature.shape[0] * 4

    def units(self, item) -> list[EncodeItem]:
        return [EncodeItem(item.feature, item.feature.shape[0], "image", (item.hash, 0))]

    def forward(self, units):
        outs = []
        for unit in units:
            x = unit.pixel_values.to(self.device, non_blocking=True)
            busy = torch.randn(2048, 2048, device=self.device)
            for _ in range(20):  # keeps the producer stream busy before the output is written
                busy = torch.tanh(busy @ busy)
            outs.append(x.sum(dim=-1, keepdim=True) * 2.0)
        return outs


def _item(hash_value: int, rows: int):
    modality = SimpleNamespace(name="IMAGE")
    pixels = torch.full((rows, 8), float(hash_value))
    return SimpleNamespace(modality=modality, hash=hash_value, feature=pixels, precomputed_embeddings=None)


@pytest.mark.parametrize("lockstep", [False, True])
def test_results_are_correct_on_a_busy_consumer_stream(lockstep):
    service = EncoderService(SlowCudaTower(), CoalescerConfig(budget_bytes=1 << 30), lockstep=lockstep).start()
    try:
        items = [_item(h, 16 + h) for h in range(1, 9)]
        service.on_arrival("r", items)
        consumer = torch.cuda.Stream()
        with torch.cuda.stream(consumer):
            hog = torch.randn(4096, 4096, device="cuda")
            for _ in range(10):
                hog = torch.tanh(hog @ hog)
            got = service.encode(items, original=lambda _: pytest.fail("fell back to the original"))
            churn = [torch.empty(1 << 20, device="cuda") for _ in range(32)]  # recycle freed blocks
            host = got.cpu()
        del churn
        expected = torch.cat([torch.full((16 + h, 1), 16.0 * h) for h in range(1, 9)])
        torch.testing.assert_close(host, expected)
        assert service.counts["taken_early"] == 8
    finally:
        service.close()


def test_lockstep_result_makes_the_consumer_stream_wait_for_the_producer():
    encoder = LockstepEncoder(SlowCudaTower(), CoalescerConfig(budget_bytes=1 << 30))
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    ticket = encoder.submit([EncodeItem(torch.full((32, 8), 3.0), 32, "image", "k")])
    with torch.cuda.stream(producer):
        encoder.step()
    with torch.cuda.stream(consumer):
        (out,) = encoder.result(ticket)
        host = (out * 2).cpu()
    torch.testing.assert_close(host, torch.full((32, 1), 96.0))
