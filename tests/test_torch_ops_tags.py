"""The kernrnn torch ops are marked unsafe for torch's own CUDA graphs."""

import pytest

torch = pytest.importorskip("torch")


def test_ops_are_tagged_cudagraph_unsafe():
    import kernrnn.torch  # noqa: F401 - registers the ops

    if getattr(torch.Tag, "cudagraph_unsafe", None) is None:
        pytest.skip("this torch has no Tag.cudagraph_unsafe")
    for op in (torch.ops.kernrnn.rnn_forward, torch.ops.kernrnn.rnn_backward):
        assert torch.Tag.cudagraph_unsafe in op.default.tags, op
