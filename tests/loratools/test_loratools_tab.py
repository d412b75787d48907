"""The tab's "LoRA tools" accordion: it builds with the installed gradio, and its handlers do the jobs."""

from __future__ import annotations

from typing import Any

import pytest
from lora_helpers import write_trained_lora

gr = pytest.importorskip("gradio")

from dreambooth.loratools.read import load_lora  # noqa: E402
from dreambooth.models.demo import write_demo_checkpoint  # noqa: E402
from dreambooth.service import TrainingService  # noqa: E402
from dreambooth.store import Layout, ModelStore  # noqa: E402
from dreambooth.ui.lora_tools import INTO_LORA, OWN_BASE, pair_weights  # noqa: E402
from dreambooth.ui.tab import DreamboothTab, guarded  # noqa: E402

from fake_host import FakeHost  # noqa: E402


@pytest.fixture(scope="module")
def tab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The built tab over a layout holding the tiny sd1 demo checkpoint and one of our LoRAs for it."""
    layout = Layout.under(tmp_path_factory.mktemp("tab") / "models").ensure()
    write_demo_checkpoint("sd1", layout.checkpoints_dir / "demo.safetensors")
    write_trained_lora("sd1", "locon", layout.lora_dir / "style.safetensors")
    store = ModelStore(layout)
    built = DreamboothTab(FakeHost(layout), TrainingService(FakeHost(layout), store), store)
    built.blocks = built.build()
    return built


def test_accordion_is_in_the_tab(tab: Any) -> None:
    config = tab.blocks.get_config_file() if hasattr(tab.blocks, "get_config_file") else tab.blocks.config
    ids = {component.get("props", {}).get("elem_id") for component in config["components"]}
    assert {"db_lora_tools", "db_lt_extract", "db_lt_resize", "db_lt_merge", "db_lt_report"} <= ids
    assert tab.lora_tools.loras() == ["style.safetensors"]
    assert tab.lora_tools.checkpoints() == ["demo.safetensors"]


def test_resize_merge_and_extract_from_the_tab(tab: Any) -> None:
    tools, layout = tab.lora_tools, tab.ctl.host.layout
    report, notice = tools.on_resize("style.safetensors", "fixed", 1, 128, "small", "fp32")
    assert "Resized LoRA" in notice and "retained" in report
    assert {module.rank for module in load_lora(layout.lora_dir / "small.safetensors").modules.values()} == {1}

    report, notice = tools.on_merge(["style.safetensors"], "1", "demo.safetensors", "fixed", 8, 128, "styled", "fp32")
    assert (layout.checkpoints_dir / "styled.safetensors").is_file() and "Merged" in notice

    report, _ = tools.on_extract("styled.safetensors", "demo.safetensors", "fixed", 4, 128, 2, "back", "fp32")
    assert "retained 100.00%" in report  # the merged LoRA has rank <= 4, so extraction keeps all of it
    source, extracted = load_lora(layout.lora_dir / "style.safetensors"), load_lora(layout.lora_dir / "back.safetensors")
    assert source.modules.keys() == extracted.modules.keys()

    report, _ = tools.on_merge(["style.safetensors", "small.safetensors"], "0.5, 0.5", INTO_LORA, "energy", 0.99, 8,
                               "", "fp32")
    assert "Merged LoRA" in report and "retained" in report


def test_tab_errors_go_to_the_message_box(tab: Any) -> None:
    tools = tab.lora_tools
    report, message = guarded(tools.on_extract, 2)("model:nobody", OWN_BASE, "fixed", 4, 128, 0, "", "fp32")
    assert "nobody" in message and not isinstance(report, str)
    _, message = guarded(tools.on_resize, 2)("../Stable-diffusion/demo.safetensors", "fixed", 1, 8, "", "fp32")
    assert "not inside" in message
    _, message = guarded(tools.on_resize, 2)("style.safetensors", "energy", 4, 8, "", "fp32")
    assert "fraction" in message
    assert not tab.ctl.service.is_busy()


def test_pair_weights() -> None:
    assert pair_weights(["a", "b"], "0.5") == [("a", 0.5), ("b", 1.0)]
    assert pair_weights(["a"], "") == [("a", 1.0)]
    with pytest.raises(Exception, match="one weight per LoRA"):
        pair_weights(["a"], "1, 2")
    with pytest.raises(Exception, match="not numbers"):
        pair_weights(["a"], "x")
