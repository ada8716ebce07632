"""torch.compile readiness (issue 27, the CPU side): every pass of a training step traces into one
graph, no break, under the dynamic-shape capture `pipeline.model.allow_data_dependent_shapes`
turns on: the full forward with the sparse MLM head and its loss, the exit pass (loss and
entropy) and the full-model scoring pass. `torch._dynamo.explain` traces without compiling, so
this costs seconds; the masked-token count varies per batch and stays a symbolic size."""
import pytest
import torch

from pipeline.model import allow_data_dependent_shapes, build_model
from pipeline.model_config import ModelConfig
from pipeline.scoring import token_pass


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="bert-tiny", exit_head="separate"), 600, 64, 0)
    ids = torch.randint(5, 600, (8, 64))
    labels = torch.full((8, 64), -100)
    hit = torch.rand(8, 64) < 0.15
    labels[hit] = ids[hit]
    ids[hit] = 4
    return model, {"input_ids": ids, "labels": labels,
                   "attention_mask": torch.ones(8, 64, dtype=torch.long)}


def passes(model):
    return {
        "train forward + loss": lambda b: model(**b).loss,
        "exit pass, loss": lambda b: token_pass(model, b, "loss", True).values,
        "exit pass, entropy": lambda b: token_pass(model, b, "entropy", True).values,
        "full scoring pass": lambda b: token_pass(model, b, "loss", False).values,
    }


def graph_breaks(fn, batch):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(batch)
    return explained.graph_count, [str(r.reason).splitlines()[0] for r in explained.break_reasons]


@pytest.mark.parametrize("name", list(passes(None)))
def test_each_pass_of_a_step_traces_as_one_graph(model_and_batch, name):
    model, batch = model_and_batch
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False,
                                    capture_scalar_outputs=False):
        allow_data_dependent_shapes()
        graphs, breaks = graph_breaks(passes(model)[name], batch)
    assert (graphs, breaks) == (1, []), breaks


def test_without_the_capture_the_sparse_head_breaks_the_graph(model_and_batch):
    """The check can fail: dynamo's defaults break at the head's data-dependent gather."""
    model, batch = model_and_batch
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False,
                                    capture_scalar_outputs=False):
        graphs, breaks = graph_breaks(passes(model)["train forward + loss"], batch)
    assert graphs > 1 and breaks
