"""Model discovery from config.pbtxt parameters (the gateway's view of the repository)."""

from __future__ import annotations

from dataclasses import replace

from export.registry import medsam_lite_entries
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
    variant = replace(encoder, name="lite_int8_encoder", parameters={
        **encoder.parameters, "medseg.model": "lite_int8", "medseg.decoder": decoder.name})
    for entry in (encoder, decoder, variant):
        write_config(tmp_path, entry, "cpu")
    models = discover(tmp_path, "medsam_lite")
    assert set(models) == {"medsam_lite", "lite_int8"}
    assert models["lite_int8"].decoder.name == decoder.name and not models["lite_int8"].info.is_default


def test_an_encoder_without_a_decoder_is_not_served(tmp_path):
    encoder, _ = medsam_lite_entries()
    write_config(tmp_path, encoder, "cpu")
    assert discover(tmp_path, "medsam_lite") == {}
