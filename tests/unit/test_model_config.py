"""Model discovery from config.pbtxt parameters (the gateway's view of the repository)."""

from __future__ import annotations

from dataclasses import replace

from export.medsam_lite import medsam_lite_entries
from export.triton_config import write_config
from service.core.domain import PromptKind
from service.backends.repository import discover


def test_litemedsam_is_discovered_with_its_prompt_rules(tmp_path):
    for entry in medsam_lite_entries():
        write_config(tmp_path, entry, "cpu")
    models = discover(tmp_path, "medsam_lite")
    lite = models["medsam_lite"]
    assert lite.info.is_default and lite.info.input_size == 256
    assert lite.info.required_prompt_kinds == {PromptKind.BOX}
    assert PromptKind.POINT not in lite.info.prompt_kinds
    assert lite.encoder.name == "medsam_lite_encoder" and lite.decoder.name == "medsam_lite_decoder"
    assert lite.decoder.input_names[0] == "image_embeddings"


def test_an_encoder_variant_can_share_another_models_decoder(tmp_path):
    encoder, decoder = medsam_lite_entries()
    variant = replace(encoder, name="lite_int8_encoder",
                      gateway=replace(encoder.gateway, model="lite_int8", decoder=decoder.name))
    for entry in (encoder, decoder, variant):
        write_config(tmp_path, entry, "cpu")
    models = discover(tmp_path, "medsam_lite")
    assert set(models) == {"medsam_lite", "lite_int8"}
    assert models["lite_int8"].decoder.name == decoder.name and not models["lite_int8"].info.is_default


def test_an_encoder_without_a_decoder_is_not_served(tmp_path):
    encoder, _ = medsam_lite_entries()
    write_config(tmp_path, encoder, "cpu")
    assert discover(tmp_path, "medsam_lite") == {}


def test_the_schema_reads_back_exactly_what_it_renders(tmp_path):
    from export.unet import unet_entry
    from service.backends.repository import RepositoryEntry

    for entry in (*medsam_lite_entries(), unet_entry("unet_x", 64, 2, "1-abc", "brain", "a test segmenter")):
        for target in ("cpu", "gpu", "tensorrt"):
            back = RepositoryEntry.parse(entry.render(target))
            assert replace(back, gateway=replace(back.gateway, target="")) == entry, (entry.name, target)
            assert back.gateway.target == target


def test_a_misspelt_gateway_parameter_is_refused_with_its_name(tmp_path):
    import pytest

    from service.backends.repository import RepositoryEntry

    encoder, _ = medsam_lite_entries()
    text = encoder.render("cpu").replace('key: "medseg.input_size"', 'key: "medseg.input_sise"')
    with pytest.raises(ValueError, match="medseg.input_sise"):
        RepositoryEntry.parse(text)


def test_runtime_parameters_are_typed_and_reach_the_runtimes_as_their_keys():
    from service.backends import runtimes
    from service.backends.repository import RepositoryEntry, RuntimeParameters

    encoder, _ = medsam_lite_entries()
    bf16 = replace(encoder, runtime=RuntimeParameters(runtime="openvino", precision="bf16", intra_op_threads=1))
    back = RepositoryEntry.parse(bf16.render("cpu"))
    assert back.runtime == bf16.runtime
    assert back.parameters == {runtimes.RUNTIME: "openvino", runtimes.PRECISION: "bf16", runtimes.THREADS: "1"}
    assert runtimes.runtime_of(back.parameters) == "openvino"


def test_a_2_5d_segmenter_is_discovered_with_its_context_and_a_channel_mismatch_is_refused(tmp_path):
    import pytest

    from export.unet import unet_entry
    from service.backends.repository import read_entry

    entry = unet_entry("unet_25d", 64, 2, "1", "thalamus", "a 2.5-D test entry", context_slices=2)
    write_config(tmp_path, entry, "cpu")
    back = read_entry(tmp_path / "unet_25d")
    assert back.inputs[0].dims == (5, 64, 64) and back.gateway.context_slices == 2
    found = discover(tmp_path, "unet_25d")["unet_25d"]
    assert found.context == 2 and found.info.context_slices == 2   # ListModels shows it
    assert discover(tmp_path, "")["unet_25d"].info.prompt_kinds == frozenset()

    write_config(tmp_path, replace(entry, gateway=replace(entry.gateway, context_slices=1)), "cpu")
    with pytest.raises(ValueError, match="has 5 channels; with medseg.context_slices 1 it takes 3"):
        discover(tmp_path, "unet_25d")
    write_config(tmp_path, unet_entry("unet_25d", 64, 2, "1", "thalamus", "2-D"), "cpu")
    assert discover(tmp_path, "unet_25d")["unet_25d"].context == 0
