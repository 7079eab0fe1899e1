//! Hugging Face folders beyond the single-file f32 case: sharded bf16 safetensors with an index,
//! and `rope_parameters` with llama3 scaling as transformers 5 writes them.

mod common;

use std::sync::Arc;

use common::{Fixture, assert_close, fixtures};
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::model::config::{ModelConfig, RopeScaling};
use edgetune::model::llama::{LoadOptions, Model, Quant};

#[test]
fn sharded_bf16_checkpoint_matches_transformers() {
    let fx = Fixture::open("hf_variants_expected.safetensors");
    let ids: Vec<u32> = fx.i64("ids").iter().map(|&i| i as u32).collect();
    let ctx =
        Arc::new(GpuContext::new(&GpuOptions::default()).unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}")));
    let open = |quant| {
        let opts = LoadOptions { quant, ..Default::default() };
        Model::open(ctx.clone(), &fixtures().join("tiny_llama_bf16_sharded"), &opts).expect("sharded model loads")
    };
    let model = open(Quant::None);
    // bf16 values widen to f32 exactly on both sides; the rest is the f32 forward pass.
    assert_close("bf16 sharded logits", &model.all_logits(&ids).expect("forward"), &fx.f32("logits"), 1e-4, 1e-4);
    // As NF4 the linear weights are quantized from the file's bf16 a chunk at a time, never
    // decoded whole; the fingerprint (what a checkpoint resumes against) samples the same values.
    assert_eq!(open(Quant::Nf4).fingerprint, model.fingerprint, "the NF4 model's fingerprint");
}

#[test]
fn llama3_rope_scaling_inside_rope_parameters_matches_transformers() {
    let fx = Fixture::open("hf_variants_expected.safetensors");
    let mut cfg: serde_json::Value = serde_json::from_str(&fx.metadata("llama3_config")).expect("json");
    // The generator's config is a bare LlamaConfig; give it the fields a checkpoint has.
    cfg["vocab_size"] = 32.into();
    let path = std::path::Path::new("llama3/config.json");
    let c = ModelConfig::from_hf_json(path, &cfg.to_string()).expect("config");
    assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })), "{:?}", c.rope_scaling);
    assert_eq!(c.rope_theta, 500000.0);
    // transformers computes the frequencies in f32, edgetune in f64 rounded once: 1e-6 relative.
    assert_close("llama3 inv_freq", &c.rope_inv_freq(), &fx.f32("llama3_inv_freq"), 1e-6, 0.0);
}

#[test]
fn unsupported_rope_scaling_is_named() {
    let text = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,
        "num_attention_heads":4,"vocab_size":32,"rope_scaling":{"rope_type":"yarn","factor":4.0}}"#;
    let e = ModelConfig::from_hf_json(std::path::Path::new("m/config.json"), text).expect_err("yarn is not supported");
    assert!(e.to_string().contains("rope_scaling type `yarn`"), "{e}");
}

#[test]
fn mistral_sliding_window_and_generation_config_eos_are_read() {
    let text = r#"{"model_type":"mistral","hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,
        "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":32,"sliding_window":4096,"eos_token_id":2}"#;
    let p = std::path::Path::new("m/config.json");
    let mut c = ModelConfig::from_hf_json(p, text).expect("mistral config");
    assert_eq!(c.sliding_window, Some(4096));
    c.merge_generation_config(std::path::Path::new("m/generation_config.json"), r#"{"eos_token_id": [2, 7]}"#)
        .expect("generation config");
    assert_eq!(c.eos_token_ids, vec![2, 7]);
    let e = c.merge_generation_config(std::path::Path::new("m/generation_config.json"), "{").expect_err("bad JSON");
    assert!(e.to_string().contains("generation_config.json"), "{e}");
}

/// Which layers slide: every layer for Mistral; `layer_types` where a config lists them;
/// Qwen2's rule (from `max_window_layers` on) only with `use_sliding_window`; a list of the
/// wrong length or an unknown layer type is an error naming the file.
#[test]
fn sliding_window_layers_are_read_from_each_kind_of_config() {
    let p = std::path::Path::new("m/config.json");
    let base = r#""hidden_size":64,"intermediate_size":128,"num_hidden_layers":3,"num_attention_heads":4,
        "num_key_value_heads":2,"vocab_size":32"#;
    let cfg = |extra: &str| ModelConfig::from_hf_json(p, &format!("{{{base},{extra}}}"));
    let windows = |c: &ModelConfig| (0..3).map(|l| c.layer_window(l)).collect::<Vec<_>>();
    let c = cfg(r#""model_type":"mistral","sliding_window":8"#).expect("mistral");
    assert_eq!(windows(&c), [Some(8); 3]);
    let c = cfg(r#""model_type":"mistral","sliding_window":null"#).expect("mistral v0.2");
    assert_eq!(windows(&c), [None; 3]);
    let c = cfg(r#""model_type":"qwen2","sliding_window":8,"use_sliding_window":false"#).expect("qwen2");
    assert_eq!(windows(&c), [None; 3]);
    let c = cfg(r#""model_type":"qwen2","sliding_window":8,"use_sliding_window":true,"max_window_layers":1"#)
        .expect("qwen2 with a window");
    assert_eq!(windows(&c), [None, Some(8), Some(8)]);
    let types = r#""layer_types":["sliding_attention","full_attention","sliding_attention"]"#;
    let c = cfg(&format!(r#""model_type":"mistral","sliding_window":8,{types}"#)).expect("layer types");
    assert_eq!(windows(&c), [Some(8), None, Some(8)]);
    let e = cfg(r#""model_type":"mistral","sliding_window":8,"layer_types":["full_attention"]"#).expect_err("short");
    assert!(e.to_string().contains("config.json") && e.to_string().contains("lists 1 layers"), "{e}");
    let bad = r#""layer_types":["chunked_attention","full_attention","full_attention"]"#;
    let e = cfg(&format!(r#""model_type":"mistral","sliding_window":8,{bad}"#)).expect_err("unknown type");
    assert!(e.to_string().contains("chunked_attention"), "{e}");
}

/// Gemma 3's configurations: transformers 5's (`rope_parameters` per layer type, `layer_types`)
/// and transformers 4's (`rope_theta` with `rope_scaling` for the global layers,
/// `rope_local_base_freq`, `sliding_window_pattern`) read alike; what edgetune cannot run is
/// refused by name.
#[test]
fn gemma3_configs_of_both_transformers_generations_are_read_and_the_rest_refused() {
    use edgetune::model::config::{Activation, RopeScaling};
    let p = std::path::Path::new("g/config.json");
    let base = r#""hidden_size":64,"intermediate_size":128,"num_hidden_layers":7,"num_attention_heads":4,
        "num_key_value_heads":2,"head_dim":32,"vocab_size":32,"sliding_window":512"#;
    let cfg = |extra: &str| ModelConfig::from_hf_json(p, &format!("{{{base},{extra}}}"));
    let old = cfg(r#""model_type":"gemma3_text","query_pre_attn_scalar":168,"rope_theta":1000000.0,
        "rope_local_base_freq":10000.0,"rope_scaling":{"rope_type":"linear","factor":8.0},"sliding_window_pattern":6"#)
    .expect("transformers 4 config");
    let windows: Vec<bool> = (0..7).map(|l| old.layer_window(l).is_some()).collect();
    assert_eq!(windows, [true, true, true, true, true, false, true]);
    assert_eq!(old.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
    assert_eq!(old.sliding_rope, Some((10000.0, None)));
    assert_eq!(old.query_scale, 1.0 / 168f32.sqrt());
    assert_eq!(old.embedding_scale, 8.0);
    assert_eq!(
        (old.hidden_act, old.norm_offset, old.sandwich_norms, old.qk_norm),
        (Activation::GeluTanh, 1.0, true, true)
    );
    assert!(old.tie_word_embeddings, "Gemma ties its head unless it says otherwise");
    let new = cfg(r#""model_type":"gemma3_text","query_pre_attn_scalar":168,"layer_types":["sliding_attention",
        "sliding_attention","sliding_attention","sliding_attention","sliding_attention","full_attention",
        "sliding_attention"],"rope_parameters":{"full_attention":{"rope_type":"linear","factor":8.0,
        "rope_theta":1000000.0},"sliding_attention":{"rope_type":"default","rope_theta":10000.0}}"#)
    .expect("transformers 5 config");
    assert_eq!(new, old, "both generations of config describe the same model");
    // A multimodal Gemma 3 (Gemma3ForConditionalGeneration): its text model from `text_config`,
    // the head's tying and EOS from the top level where the text config names none.
    let mm = ModelConfig::from_hf_json(
        p,
        &format!(
            r#"{{"model_type":"gemma3","eos_token_id":[1,106],"tie_word_embeddings":true,"vision_config":{{}},
            "text_config":{{{base},"model_type":"gemma3_text","query_pre_attn_scalar":168,"rope_theta":1000000.0,
            "rope_local_base_freq":10000.0,"rope_scaling":{{"rope_type":"linear","factor":8.0}},
            "sliding_window_pattern":6}}}}"#
        ),
    )
    .expect("multimodal config");
    assert!(mm.multimodal);
    assert_eq!(mm.eos_token_ids, [1, 106]);
    assert_eq!(ModelConfig { multimodal: false, eos_token_ids: old.eos_token_ids.clone(), ..mm }, old);
    for (extra, named) in [
        (r#""model_type":"gemma3""#, "without a `text_config`"),
        (r#""model_type":"gemma""#, "Gemma 1"),
        (r#""model_type":"gemma3_text","final_logit_softcapping":0.0"#, "final_logit_softcapping"),
        (r#""model_type":"gemma3_text","use_bidirectional_attention":true"#, "embedding model"),
        (r#""model_type":"gemma3_text","hidden_activation":"relu""#, "relu"),
    ] {
        let e = cfg(extra).expect_err(extra).to_string();
        assert!(e.contains("config.json") && e.contains(named), "{extra}: {e}");
    }
}

/// Gemma 2's configs: Gemma 3's norms, embedding scale, GeGLU and query scale, no q/k norms,
/// one RoPE base, both soft caps, and without `layer_types` (transformers 4) the even layers
/// within the window, as with them.
#[test]
fn gemma2_configs_are_read_with_their_soft_caps_and_alternating_windows() {
    use edgetune::model::config::Activation;
    let p = std::path::Path::new("g/config.json");
    let base = r#""model_type":"gemma2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":4,
        "num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,"vocab_size":32,"sliding_window":4096,
        "query_pre_attn_scalar":256,"attn_logit_softcapping":50.0,"final_logit_softcapping":30.0"#;
    let old = ModelConfig::from_hf_json(p, &format!("{{{base}}}")).expect("transformers 4 config");
    let windows: Vec<bool> = (0..4).map(|l| old.layer_window(l).is_some()).collect();
    assert_eq!(windows, [true, false, true, false]);
    assert_eq!((old.attn_softcap, old.final_softcap), (Some(50.0), Some(30.0)));
    assert_eq!((old.query_scale, old.embedding_scale), (1.0 / 16.0, 8.0));
    assert_eq!(
        (old.hidden_act, old.norm_offset, old.sandwich_norms, old.qk_norm, old.sliding_rope.clone()),
        (Activation::GeluTanh, 1.0, true, false, None)
    );
    assert!(old.tie_word_embeddings);
    let types = r#""layer_types":["sliding_attention","full_attention","sliding_attention","full_attention"]"#;
    let new = ModelConfig::from_hf_json(p, &format!("{{{base},{types}}}")).expect("transformers 5 config");
    assert_eq!(new, old, "both generations of config describe the same model");
}

/// Phi-3.5's and Phi-4-mini's RoPE as their transformers 4 configs give it (`rope_scaling`
/// with `type: longrope`, `original_max_position_embeddings` at the top level): the short
/// factors, the attention factor from the ratio of the contexts, and partial rotation; a
/// factor list of the wrong length, or no original context, is an error naming the file.
#[test]
fn phi3_longrope_and_partial_rotary_configs_are_read_and_checked() {
    use edgetune::model::config::RopeScaling;
    let p = std::path::Path::new("phi/config.json");
    let base = r#""model_type":"phi3","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
        "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":32,"max_position_embeddings":131072"#;
    let cfg = |extra: &str| ModelConfig::from_hf_json(p, &format!("{{{base}{extra}}}"));
    let c = cfg("").expect("phi3");
    assert!(c.fused_projections && c.rotary_dim == 16 && c.rope_scaling.is_none());
    let c = cfg(r#","partial_rotary_factor":0.75,"original_max_position_embeddings":4096,
        "rope_scaling":{"type":"longrope","short_factor":[1,1,1,1,1,2],"long_factor":[1,2,3,4,5,6]}"#)
    .expect("Phi-4-mini's RoPE");
    assert_eq!(c.rotary_dim, 12);
    let Some(RopeScaling::LongRope { short_factor, original_max_position, attention_factor, .. }) = &c.rope_scaling
    else {
        panic!("{:?}", c.rope_scaling)
    };
    assert_eq!((short_factor.len(), *original_max_position), (6, 4096));
    // sqrt(1 + ln(131072 / 4096) / ln(4096)) = sqrt(1 + 5 / 12), as transformers computes it.
    assert!((attention_factor - (1.0f32 + 5.0 / 12.0).sqrt()).abs() < 1e-6, "{attention_factor}");
    assert_eq!(c.rope_context(), 4096, "the short factors run up to the original context");
    for (extra, named) in [
        (
            r#","original_max_position_embeddings":4096,"rope_scaling":{"type":"longrope","short_factor":[1.0],
            "long_factor":[1.0]}"#,
            "8 expected",
        ),
        (
            r#","rope_scaling":{"type":"longrope","short_factor":[1,1,1,1,1,1,1,1],"long_factor":[1,1,1,1,1,1,1,1]}"#,
            "original_max_position_embeddings",
        ),
        (r#","partial_rotary_factor":0.01"#, "partial_rotary_factor"),
    ] {
        let e = cfg(extra).expect_err(extra).to_string();
        assert!(e.contains("config.json") && e.contains(named), "{extra}: {e}");
    }
}
