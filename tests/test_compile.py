"""`torch.compile` keeps working on the model and gives eager's outputs and gradients.

The backend is `aot_eager` (Dynamo's graph capture and AOTAutograd, run by eager kernels): inductor also works here
but spends about four minutes compiling C++ for the tiny preset on this 2-core CPU, too slow for the suite.
Data-dependent input checks (`bool(...)` on tensors) break the graph into a few pieces; that is expected.
"""

import torch

from helpers import tiny_inputs, tiny_model

ATOL = 1e-5


def test_compiled_forward_and_backward_match_eager():
    torch._dynamo.reset()
    model = tiny_model()
    inputs = tiny_inputs()
    compiled = torch.compile(model, backend="aot_eager")

    with torch.no_grad():
        expected = model(**{key: value for key, value in inputs.items() if key != "labels"})
        actual = compiled(**{key: value for key, value in inputs.items() if key != "labels"})
    for name in ("logits", "coarse_logits", "uncertainty_logits"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=ATOL, rtol=1e-4)

    model.train()  # dropout and drop-path draw the same numbers from the same seed in both
    torch.manual_seed(1)
    expected = model(**inputs)
    expected.loss.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    actual = compiled(**inputs)
    actual.loss.backward()
    torch.testing.assert_close(actual.loss, expected.loss, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(actual.uncertainty_loss, expected.uncertainty_loss, atol=ATOL, rtol=1e-4)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=ATOL, rtol=1e-4, msg=name)
