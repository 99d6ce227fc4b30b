"""Checks shared by the per-family tests: the turn-by-turn KV-cache forward equals one full forward."""

import torch


def layer_outputs(loaded, fwd):
    """The output of every LM decoder layer during fwd(), concatenated over the calls fwd makes."""
    outs = {}
    layers = loaded.adapter.lm_layers(loaded.hf_model)
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: outs.setdefault(i, []).append(o[0] if isinstance(
        o, tuple) else o)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            fwd()
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(outs[i], dim=1) for i in range(len(layers))]


def assert_chunked_matches_full(loaded, rendered, atol=1e-4):
    """Feed the session turn by turn through the KV cache, as capture does, and compare with one pass."""
    model, adapter = loaded.hf_model, loaded.adapter
    ids = rendered.input_ids
    pos = adapter.position_ids(model, ids, adapter.image_inputs(rendered.images))

    def chunked():
        cache = None
        for a, b in rendered.turn_chunks():
            ks = rendered.images_in(a, b)
            inputs = adapter.image_inputs([rendered.images[k] for k in ks]) if ks else {}
            out = model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True,
                        position_ids=None if pos is None else pos[..., a:b],
                        **inputs, **adapter.forward_extras(ids, a, b))
            cache = out.past_key_values

    def full():
        model(input_ids=ids, position_ids=pos, **adapter.image_inputs(rendered.images),
              **adapter.forward_extras(ids, 0, ids.shape[1]))

    got, ref = layer_outputs(loaded, chunked), layer_outputs(loaded, full)
    for g, r in zip(got, ref):
        assert g.shape == r.shape == (1, ids.shape[1], loaded.d_model)
        torch.testing.assert_close(g, r, atol=atol, rtol=0)
    return ref
