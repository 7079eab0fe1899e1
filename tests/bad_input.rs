//! Bad input gets an error that names the file and what was wrong; nothing panics.

mod common;

use std::path::{Path, PathBuf};

use edgetune::model::gguf::GgufFile;
use edgetune::model::open_weights;
use edgetune::tokenizer::Tokenizer;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgetune-bad-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

fn copy_tiny(to: &Path) {
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(common::fixtures().join("tiny_llama").join(f), to.join(f)).expect("copy");
    }
}

fn err_of<T: std::fmt::Debug>(r: edgetune::Result<T>) -> String {
    r.expect_err("must fail").to_string()
}

/// A GGUF string: its length, then its bytes.
fn gguf_str(v: &str) -> Vec<u8> {
    [(v.len() as u64).to_le_bytes().to_vec(), v.as_bytes().to_vec()].concat()
}

/// A GGUF v3 header for `n_tensors` tensors, then metadata as (key, value type, encoded value).
fn gguf_header(n_tensors: u64, kvs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (key, ty, value) in kvs {
        b.extend(gguf_str(key));
        b.extend(ty.to_le_bytes());
        b.extend(value);
    }
    b
}

/// A GGUF array value: element type, count, then the encoded elements.
fn gguf_array(element_type: u32, elements: &[Vec<u8>]) -> Vec<u8> {
    let mut b = element_type.to_le_bytes().to_vec();
    b.extend((elements.len() as u64).to_le_bytes());
    b.extend(elements.concat());
    b
}

/// A minimal GGUF v3 file: header, the given metadata, one F32 tensor `t` of 4 values.
fn gguf_bytes(arch: &str, tensor_type: u32) -> Vec<u8> {
    let mut b = gguf_header(1, &[("general.architecture", 8, gguf_str(arch))]);
    b.extend(gguf_str("t"));
    b.extend(1u32.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(tensor_type.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend([0u8; 16]);
    b
}

#[test]
fn truncated_gguf_names_the_file_and_the_tensor() {
    let d = tmpdir("gguf-trunc");
    let p = d.join("m.gguf");
    let bytes = gguf_bytes("llama", 0);
    std::fs::write(&p, &bytes[..bytes.len() - 8]).expect("write");
    let e = err_of(GgufFile::open(&p));
    assert!(e.contains("m.gguf") && e.contains("tensor `t`") && e.contains("truncated"), "{e}");
    std::fs::write(&p, &bytes[..20]).expect("write");
    let e = err_of(GgufFile::open(&p));
    assert!(e.contains("m.gguf") && e.contains("file ends"), "{e}");
    std::fs::write(&p, b"not a gguf file at all").expect("write");
    assert!(err_of(GgufFile::open(&p)).contains("not a GGUF file"));
}

#[test]
fn unknown_architecture_and_tensor_type_are_named() {
    let d = tmpdir("gguf-arch");
    let p = d.join("m.gguf");
    std::fs::write(&p, gguf_bytes("mamba", 0)).expect("write");
    let e = err_of(open_weights(&p));
    assert!(e.contains("architecture `mamba`"), "{e}");
    std::fs::write(&p, gguf_bytes("llama", 11)).expect("write");
    let e = err_of(GgufFile::open(&p));
    assert!(e.contains("Q3_K") && e.contains("tensor `t`"), "{e}");
}

#[test]
fn corrupt_safetensors_and_mismatched_shapes_are_named() {
    let d = tmpdir("st");
    copy_tiny(&d);
    std::fs::write(d.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage").expect("write");
    let e = err_of(open_weights(&d));
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");

    copy_tiny(&d);
    let cfg = d.join("config.json");
    let text =
        std::fs::read_to_string(&cfg).expect("read").replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg, text).expect("write");
    let (c, src) = open_weights(&d).expect("opens");
    let e = err_of(src.get(&c, "model.layers.0.mlp.gate_proj.weight", &[c.intermediate_size, c.hidden_size]));
    assert!(e.contains("gate_proj") && e.contains("[128, 64]") && e.contains("[96, 64]"), "{e}");
}

#[test]
fn unknown_architecture_in_config_json_is_named() {
    let d = tmpdir("arch");
    copy_tiny(&d);
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\"");
    std::fs::write(&cfg, text).expect("write");
    let e = err_of(open_weights(&d));
    assert!(e.contains("config.json") && e.contains("gpt_neox"), "{e}");
    std::fs::write(&cfg, "{ not json").expect("write");
    assert!(err_of(open_weights(&d)).contains("invalid JSON"));
}

/// Gemma 2's soft caps (`attn_logit_softcapping`, `final_logit_softcapping`) are read when
/// they are positive numbers, left off when null, and anything else is refused naming the field.
#[test]
fn soft_caps_are_read_or_refused_naming_the_field() {
    let d = tmpdir("softcap");
    copy_tiny(&d);
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg).expect("read");
    for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
        let read = |v: &str| {
            let with = text.replacen('{', &format!("{{\"{key}\": {v},"), 1);
            edgetune::model::config::ModelConfig::from_hf_json(&cfg, &with)
        };
        let caps = |c: &edgetune::model::config::ModelConfig| match key {
            "attn_logit_softcapping" => (c.attn_softcap, c.final_softcap),
            _ => (c.final_softcap, c.attn_softcap),
        };
        assert_eq!(caps(&read("50.0").expect("a cap")), (Some(50.0), None), "{key}");
        assert_eq!(caps(&read("null").expect("no cap")), (None, None), "{key}");
        for bad in ["0", "-1.5", "\"high\""] {
            let e = err_of(read(bad));
            assert!(e.contains("config.json") && e.contains(key), "{key} {bad}: {e}");
        }
    }
}

/// Qwen3's mixture-of-experts variant is refused by name, from config.json and from GGUF.
#[test]
fn qwen3_mixture_of_experts_is_refused_by_name() {
    let d = tmpdir("moe");
    copy_tiny(&d);
    let cfg = d.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"qwen3_moe\"");
    std::fs::write(&cfg, text).expect("write");
    let e = err_of(open_weights(&d));
    assert!(e.contains("config.json") && e.contains("qwen3_moe") && e.contains("dense Qwen3"), "{e}");
    let p = d.join("m.gguf");
    std::fs::write(&p, gguf_bytes("qwen3moe", 0)).expect("write");
    let e = err_of(open_weights(&p));
    assert!(e.contains("m.gguf") && e.contains("qwen3moe") && e.contains("dense Qwen3"), "{e}");
}

/// Sizes in a config.json beyond any real model are refused before anything is sized from them,
/// naming the file and the field; so is a LoRA rank beyond any real use.
#[test]
fn oversized_config_values_are_refused_naming_the_field() {
    let d = tmpdir("oversized");
    for (from, to, field) in [
        ("\"hidden_size\": 64", "\"hidden_size\": 1000000", "hidden_size 1000000"),
        ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 100000", "num_hidden_layers 100000"),
        // Found by the fuzzer: a layer count sized a per-layer table (which layers slide) before
        // the bounds were checked, an allocation of terabytes.
        ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3333333333333", "num_hidden_layers 3333333333333"),
        ("\"vocab_size\": 320", "\"vocab_size\": 4000000000", "vocab_size 4000000000"),
    ] {
        copy_tiny(&d);
        let cfg = d.join("config.json");
        let text = std::fs::read_to_string(&cfg).expect("read");
        assert!(text.contains(from), "fixture has {from}");
        std::fs::write(&cfg, text.replace(from, to)).expect("write");
        let e = err_of(open_weights(&d));
        assert!(e.contains("config.json") && e.contains(field) && e.contains("the most edgetune accepts"), "{e}");
    }
    // The same count in a GGUF file's metadata.
    let p = d.join("m.gguf");
    let u64_kv = |k: &'static str, v: u64| (k, 10u32, v.to_le_bytes().to_vec());
    let mut b = gguf_header(
        0,
        &[
            ("general.architecture", 8, gguf_str("llama")),
            u64_kv("llama.embedding_length", 64),
            u64_kv("llama.attention.head_count", 4),
            u64_kv("llama.vocab_size", 320),
            u64_kv("llama.block_count", 3_333_333_333_333),
        ],
    );
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    std::fs::write(&p, b).expect("write");
    let e = err_of(open_weights(&p));
    assert!(e.contains("m.gguf") && e.contains("llama.block_count 3333333333333 is more than 4096"), "{e}");
    let big = edgetune::lora::LoraConfig { r: edgetune::lora::MAX_RANK + 1, ..Default::default() };
    let e = big.validate().expect_err("rank too large").to_string();
    assert!(e.contains("r 4097") && e.contains("4096"), "{e}");
    assert!(edgetune::lora::LoraConfig { r: 256, ..Default::default() }.validate().is_ok());
}

#[test]
fn missing_tokenizer_is_named() {
    let d = tmpdir("tok");
    copy_tiny(&d);
    std::fs::remove_file(d.join("tokenizer.json")).expect("rm");
    let e = err_of(Tokenizer::from_hf_dir(&d));
    assert!(e.contains("tokenizer.json is missing"), "{e}");
}

/// A sharded model's index names its files: each must be a file inside the model folder, so an
/// index cannot make edgetune open `/etc/passwd`, climb out with `..`, or map a folder.
#[test]
fn shard_paths_stay_inside_the_model_folder() {
    let dir = tmpdir("shards");
    copy_tiny(&dir);
    std::fs::rename(dir.join("model.safetensors"), dir.join("model-00001-of-00001.safetensors")).expect("rename");
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    let index = |file: &str| {
        let j = serde_json::json!({"weight_map": {"model.embed_tokens.weight": file}});
        std::fs::write(dir.join("model.safetensors.index.json"), j.to_string()).expect("write");
    };
    for (name, why) in [
        ("../model-00001-of-00001.safetensors", "not a file inside the model folder"),
        ("/etc/passwd", "not a file inside the model folder"),
        ("sub/../../x.safetensors", "not a file inside the model folder"),
        ("", "not a file inside the model folder"),
        ("sub", "which is not a file"),
        ("missing.safetensors", "missing.safetensors"),
    ] {
        index(name);
        let err = err_of(open_weights(&dir));
        assert!(err.contains("model.safetensors.index.json") || err.contains(name), "{name}: {err}");
        assert!(err.contains(why), "{name}: {err}");
    }
    index("model-00001-of-00001.safetensors");
    open_weights(&dir).expect("a file inside the folder opens");
}

/// A chat template comes with the model file, so its work is bounded: one that loops without
/// end stops with an error that says so, promptly, while real templates render.
#[test]
fn a_chat_template_that_never_ends_is_stopped() {
    use edgetune::tokenizer::Message;
    let mut tok = Tokenizer::open(&common::fixtures().join("tiny_llama")).expect("tokenizer");
    let messages = [Message::new("user", "Hi")];
    tok.chat_template = Some("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}".into());
    assert_eq!(tok.apply_chat_template(&messages, false).expect("renders"), "<user>Hi");
    tok.chat_template =
        Some("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}".into());
    let started = std::time::Instant::now();
    let err = err_of(tok.apply_chat_template(&messages, true));
    assert!(err.contains("steps of work") && err.contains("loops without end"), "{err}");
    assert!(started.elapsed().as_secs() < 30, "stopped only after {:?}", started.elapsed());
}

/// Deriving SentencePiece merges from scores splits every token at every character, so its
/// work grows with the square of a token's length: a GGUF file with one 100,000-byte token is
/// refused with the metadata key, promptly, instead of stalling the load.
#[test]
fn tokens_too_long_to_derive_merges_from_are_refused() {
    let long = "a".repeat(100_000);
    let mut b = gguf_header(
        0,
        &[
            ("general.architecture", 8, gguf_str("llama")),
            ("tokenizer.ggml.model", 8, gguf_str("llama")),
            ("tokenizer.ggml.tokens", 9, gguf_array(8, &[gguf_str("a"), gguf_str(&long)])),
            ("tokenizer.ggml.scores", 9, gguf_array(6, &[0f32.to_le_bytes().to_vec(), (-1f32).to_le_bytes().to_vec()])),
        ],
    );
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    let dir = tmpdir("long-token");
    let path = dir.join("long.gguf");
    std::fs::write(&path, &b).expect("write");
    let g = GgufFile::open(&path).expect("the file itself is well formed");
    let started = std::time::Instant::now();
    let err = err_of(Tokenizer::from_gguf(&g));
    assert!(err.contains("long.gguf") && err.contains("tokenizer.ggml.tokens") && err.contains("too long"), "{err}");
    assert!(started.elapsed().as_secs() < 10, "took {:?}", started.elapsed());
}

/// A metadata array's count is bounded by the file's size, and also by what real files hold, so
/// a file of a few MB cannot make the reader build tens of millions of values.
#[test]
fn a_metadata_array_longer_than_any_real_one_is_refused() {
    let n = edgetune::model::gguf::MAX_ARRAY_LEN + 1;
    let mut count = 0u32.to_le_bytes().to_vec(); // u8 elements
    count.extend((n as u64).to_le_bytes());
    let mut b = gguf_header(0, &[("bytes", 9, count)]);
    b.resize(b.len() + n, 7);
    let dir = tmpdir("long-array");
    let path = dir.join("array.gguf");
    std::fs::write(&path, &b).expect("write");
    let err = err_of(GgufFile::open(&path));
    assert!(err.contains("array.gguf") && err.contains("metadata `bytes`") && err.contains("at most"), "{err}");
}

/// An adapter whose config claims a rank its tensors do not hold is refused before memory is
/// sized by the claim. Here r 4096 over a model of the widest accepted shape (hidden 2^17,
/// intermediate 2^19, two layers) is a 99 GB layout: allocated up front, as it once was, it
/// aborts the process instead of returning an error.
#[test]
fn an_adapter_rank_its_tensors_do_not_bear_out_is_refused_before_allocating() {
    let d = tmpdir("rank-claim");
    let fx = common::fixtures().join("peft_llama_adapter");
    std::fs::copy(fx.join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).expect("copy");
    let cfg = std::fs::read_to_string(fx.join("adapter_config.json")).expect("read");
    assert!(cfg.contains("\"r\": 4,"), "fixture has r 4");
    std::fs::write(d.join("adapter_config.json"), cfg.replace("\"r\": 4,", "\"r\": 4096,")).expect("write");
    let model_json = std::fs::read_to_string(common::fixtures().join("tiny_llama/config.json")).expect("read");
    let mut wide = model_json.clone();
    for (from, to) in [
        ("\"hidden_size\": 64", "\"hidden_size\": 131072"),
        ("\"intermediate_size\": 128", "\"intermediate_size\": 524288"),
        ("\"head_dim\": 16", "\"head_dim\": 256"),
        ("\"num_attention_heads\": 4", "\"num_attention_heads\": 512"),
        ("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 512"),
    ] {
        assert!(wide.contains(from), "fixture has {from}");
        wide = wide.replace(from, to);
    }
    let model = edgetune::model::config::ModelConfig::from_hf_json(&d.join("config.json"), &wide).expect("accepted");
    let e = err_of(edgetune::lora::peft::load(&d, &model));
    assert!(e.contains("adapter_model.safetensors") && e.contains("[4096, 131072]"), "{e}");
}

/// A PEFT adapter that lacks one matrix of a module it adapts elsewhere is refused, naming the
/// missing tensor by the key PEFT would have written for it (and the file); one that lacks a
/// module on one layer only is refused naming the layer and the module (the kernels adapt a
/// module on every layer or on none).
#[test]
fn a_peft_adapter_missing_a_matrix_or_a_layers_module_is_refused_naming_it() {
    let d = tmpdir("missing-lora");
    let fx = common::fixtures().join("peft_llama_adapter");
    std::fs::copy(fx.join("adapter_config.json"), d.join("adapter_config.json")).expect("copy");
    let bytes = std::fs::read(fx.join("adapter_model.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("fixture");
    let config = common::fixtures().join("tiny_llama/config.json");
    let model =
        edgetune::model::config::ModelConfig::from_hf_json(&config, &std::fs::read_to_string(&config).expect("read"))
            .expect("tiny Llama");
    // The adapter's error with the fixture's tensors but those whose names `gone` accepts.
    let load_without = |gone: &dyn Fn(&str) -> bool| {
        let kept: Vec<_> = st.tensors().into_iter().filter(|(name, _)| !gone(name)).collect();
        assert!(kept.len() < st.len(), "the fixture holds what is taken out");
        std::fs::write(d.join("adapter_model.safetensors"), safetensors::serialize(kept, None).expect("serialize"))
            .expect("write");
        err_of(edgetune::lora::peft::load(&d, &model))
    };
    let b = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    let e = load_without(&|name| name == b);
    assert!(e.contains("adapter_model.safetensors") && e.contains(&format!("tensor `{b}` is missing")), "{e}");
    let e = load_without(&|name| name.contains(".layers.1.self_attn.v_proj."));
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("only some layers: layer 1 has no `v_proj` adapter"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// A file that edgetune reads whole and that is larger than its kind allows is refused from its
/// size, naming the file and the limit, before anything is allocated for it. The files are
/// sparse (their length set, no data written), so each takes no disk and no time; read whole,
/// the data file alone would be a 1 GiB allocation (and a file larger than memory an abort).
#[test]
fn files_larger_than_their_kind_allows_are_refused_before_reading() {
    use edgetune::data::{self, DataConfig};
    use edgetune::files;
    let sparse = |path: &Path, len: u64| {
        std::fs::File::create(path).and_then(|f| f.set_len(len)).expect("sparse file");
    };
    let d = tmpdir("huge");
    copy_tiny(&d);
    sparse(&d.join("config.json"), files::CONFIG_BYTES + 1);
    let e = err_of(open_weights(&d));
    assert!(e.contains("config.json") && e.contains("a configuration file may be at most 67108864 bytes"), "{e}");

    copy_tiny(&d);
    sparse(&d.join("tokenizer.json"), files::TOKENIZER_BYTES + 1);
    let e = err_of(Tokenizer::from_hf_dir(&d));
    assert!(e.contains("tokenizer.json: is 536870913 bytes; tokenizer.json may be at most 536870912"), "{e}");

    copy_tiny(&d);
    let tok = Tokenizer::from_hf_dir(&d).expect("tokenizer");
    let data = d.join("notes.jsonl");
    sparse(&data, files::DATA_FILE_BYTES + 1);
    let e = err_of(data::load(&data, &tok, &DataConfig::default()));
    assert!(e.contains("notes.jsonl") && e.contains("one training data file may be at most 1073741824 bytes"), "{e}");
    assert!(e.contains("split a large file into several in a folder"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// A random-weight Llama of the given widths (one layer, the tiny Llama's vocabulary of 320),
/// opened with `opts` on the default adapter: shapes that reach the GPU's limits without a
/// large model's weights.
fn random_llama(
    name: &str,
    dims: (usize, usize, usize, usize, usize),
    positions: usize,
    opts: &edgetune::model::llama::LoadOptions,
) -> edgetune::Result<edgetune::model::llama::Model> {
    random_llama_on(std::sync::Arc::new(common::gpu()), name, dims, positions, opts)
}

/// [`random_llama`] on the context `ctx`.
fn random_llama_on(
    ctx: std::sync::Arc<edgetune::gpu::GpuContext>,
    name: &str,
    (hidden, mlp, heads, kv_heads, head_dim): (usize, usize, usize, usize, usize),
    positions: usize,
    opts: &edgetune::model::llama::LoadOptions,
) -> edgetune::Result<edgetune::model::llama::Model> {
    let d = tmpdir(name);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": mlp, "num_hidden_layers": 1, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": 320,
        "max_position_embeddings": positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true,
    });
    let path = d.join("config.json");
    std::fs::write(&path, config.to_string()).expect("config");
    let (cfg, src) = edgetune::model::open_random(path.to_str().expect("a UTF-8 path"), 0)?;
    edgetune::model::llama::Model::load(ctx, cfg, &src, opts)
}

/// A GPU runs at most 65,535 workgroups along a grid dimension and binds at most
/// `max_storage_buffer_binding_size` bytes of a buffer at once (128 MiB on lavapipe), and a pass
/// runs a workgroup per token and binds each activation whole; wgpu would refuse such a pass
/// only when it ran, in its own words. So: a training batch past either limit is refused when
/// the workspace is planned, naming batch_tokens; a prompt asked for its next token, and a text
/// scored, run in passes that fit whatever `prefill_chunk` says (the same logits and losses as
/// smaller passes, and as one pass over a prefix); a KV cache whose layer buffer cannot be
/// bound is refused naming max_context and the most that fits.
#[test]
fn passes_past_the_gpus_grids_and_bindings_are_refused_or_run_in_chunks() {
    use edgetune::model::llama::{LoadOptions, Quant};
    use edgetune::model::training::WorkspacePlan;
    let opts = |max_context, prefill_chunk| LoadOptions {
        quant: Quant::Nf4,
        max_context,
        prefill_chunk,
        ..Default::default()
    };
    // An MLP 65,536 wide: a binding holds binding / 256 KiB tokens of it (512 on lavapipe).
    let binding = common::gpu().limits.max_storage_buffer_binding_size as usize;
    let most = (binding / 4 / 65536).min(65535);
    let wide = random_llama("wide-mlp", (64, 65536, 2, 1, 32), 1 << 17, &opts(most + 8, 1024)).expect("wide");
    assert_eq!(wide.max_pass_tokens(4, 0), most);
    wide.workspace_bytes(WorkspacePlan::new(most, 4)).expect("a batch that fits");
    let err = err_of(wide.workspace_bytes(WorkspacePlan::new(most + 1, 4)));
    for part in [format!("{} tokens in one pass", most + 1), format!("at most {most}"), "batch_tokens".into()] {
        assert!(err.contains(&part), "{part}: {err}");
    }
    let ids: Vec<u32> = (0..most + 1).map(|i| (i * 7 % 256) as u32).collect();
    // Asked for the next token, the same prompt runs in chunks of at most `most` (two here),
    // and gives the logits of chunks half as long.
    let mut cache = wide.new_cache().expect("cache");
    let got = wide.next_logits(&ids, &mut cache).expect("a prompt past one pass");
    assert_eq!(cache.len, ids.len());
    let halves = random_llama("wide-mlp", (64, 65536, 2, 1, 32), 1 << 17, &opts(most + 8, most / 2)).expect("wide");
    let want = halves.next_logits(&ids, &mut halves.new_cache().expect("cache")).expect("halves");
    common::assert_close("chunks that fit against half as long", &got, &want, 1e-4, 1e-4);
    // Scored, the same text runs as `most` tokens and then one (the decoding pass) with their
    // hidden states copied into one buffer: every position's loss is the one passes half as long
    // give, and, over the first half, the one a single pass over that half gives.
    let mut cache = wide.new_cache().expect("cache");
    let hidden = wide.forward_hidden(&ids, &mut cache).expect("a text past one pass");
    assert_eq!((cache.len, hidden.size()), (ids.len(), (ids.len() * 64 * 4) as u64));
    let got = wide.token_losses_with(&ids, None).expect("scored in passes");
    let want = halves.token_losses_with(&ids, None).expect("scored in half passes");
    common::assert_close("losses in passes against half as long", &got, &want, 1e-4, 1e-4);
    let prefix = wide.token_losses_with(&ids[..most / 2 + 1], None).expect("one pass");
    common::assert_close("losses in passes against one pass over a prefix", &got[..most / 2], &prefix, 1e-4, 1e-4);
    // A narrow model meets the grid's limit first.
    let narrow = random_llama("narrow", (64, 128, 2, 1, 32), 4096, &opts(2048, 1024)).expect("narrow");
    assert_eq!(narrow.max_pass_tokens(4, 0), 65535);
    let err = err_of(narrow.workspace_bytes(WorkspacePlan::new(65536, 4)));
    assert!(err.contains("65536 tokens in one pass") && err.contains("at most 65535"), "{err}");
    // Keys of 32 heads of 128 (16 KiB a token): a cache twice the binding is refused.
    let tokens = binding / (32 * 128 * 4) * 2;
    let kv = random_llama("wide-kv", (64, 128, 32, 32, 128), tokens, &opts(tokens, 1024)).expect("wide kv");
    let err = err_of(kv.new_cache());
    let fits = binding / (32 * 128 * 4);
    assert!(err.contains("max_context") && err.contains(&format!("at most {fits}")), "{err}");
}

/// Where a GPU trains fewer tokens in one pass than the automatic `batch_tokens` would take
/// (a 16,384-wide MLP on a device opened to bind 32 MiB at a time: 512), the rule stays within
/// it and says why, and trains records alone rather than chain them into longer conversations;
/// a sample longer than that, trained or validating, is refused when the run is planned, naming
/// data.max_len and the most that fits, and an explicit batch_tokens past it when the workspace
/// is.
#[test]
fn an_automatic_batch_stays_within_what_the_gpu_trains_in_one_pass() {
    use edgetune::data::{DataConfig, Source};
    use edgetune::gpu::{GpuContext, GpuOptions};
    use edgetune::model::llama::{LoadOptions, Quant};
    use edgetune::train::{TrainConfig, Trainer};
    let gpu = GpuContext::new(&GpuOptions { max_storage_binding: Some(32 << 20), ..Default::default() }).expect("gpu");
    assert_eq!(gpu.report.max_storage_buffer_binding_size, 32 << 20);
    let most = 512;
    let opts = LoadOptions { quant: Quant::Nf4, max_context: 2 * most, ..Default::default() };
    let model = random_llama_on(std::sync::Arc::new(gpu), "wide-batch", (64, 16384, 2, 1, 32), 4 * most, &opts);
    let model = std::sync::Arc::new(model.expect("wide"));
    assert_eq!(model.max_batch_tokens(16, false), most);
    let tok = Tokenizer::open(&common::fixtures().join("tiny_llama")).expect("tokenizer");
    let load = |records: Vec<String>, max_len: usize| {
        let source = Source::Records { name: "facts".into(), records };
        edgetune::data::load_sources(&[source], &tok, &DataConfig { max_len, ..Default::default() }).expect("data")
    };
    let fact = |i: usize| serde_json::json!({"instruction": format!("Fact {i}?"), "output": format!("It is {i}.")});
    // Enough facts that a quarter of their tokens is more than the GPU's pass.
    let facts = load((0..400).map(|i| fact(i).to_string()).collect(), 512);
    let tokens: usize = facts.train.iter().map(|s| s.ids.len()).sum();
    assert!(tokens.div_ceil(4) > most, "{tokens} tokens");
    let cfg = TrainConfig { max_steps: Some(1), ..Default::default() };
    let t = Trainer::new(model.clone(), &facts, cfg.clone()).expect("an automatic batch that fits");
    assert_eq!(t.config().batch_tokens, Some(most));
    let why = &t.chosen().iter().find(|c| c.setting == "batch_tokens").expect("chosen").why;
    assert!(why.starts_with("the most this GPU trains in one pass"), "{why}");
    // One sample past the pass, within the context: about one and a half passes of words.
    let per_word = tok.encode(&"Fact? ".repeat(64)).expect("tokens").len().div_ceil(64);
    let words = "Fact? ".repeat(3 * most / 2 / per_word);
    let long = serde_json::json!({"instruction": words, "output": "It is."}).to_string();
    let data = load(vec![long.clone(), fact(1).to_string()], 2 * most - 8);
    let longest = data.train.iter().map(|s| s.ids.len()).max().expect("samples");
    assert!(longest > most && longest < 2 * most, "{longest} tokens");
    let err = err_of(Trainer::new(model.clone(), &data, cfg.clone()));
    for part in [format!("the longest sample has {longest} tokens"), format!("lower data.max_len to at most {most}")] {
        assert!(err.contains(&part), "{part}: {err}");
    }
    // The same sample as the user's own validation record is refused alike.
    let val = tmpdir("long-val").join("val.jsonl");
    std::fs::write(&val, format!("{long}\n")).expect("validation file");
    let source = Source::Records { name: "facts".into(), records: (0..12).map(|i| fact(i).to_string()).collect() };
    let with_val = DataConfig { max_len: 2 * most - 8, val_data: Some(val), ..Default::default() };
    let data = edgetune::data::load_sources(&[source], &tok, &with_val).expect("data");
    assert_eq!((data.val.len(), data.val[0].ids.len()), (1, longest), "the long sample validates");
    let err = err_of(Trainer::new(model.clone(), &data, cfg.clone()));
    assert!(err.contains(&format!("the longest sample has {longest} tokens")), "{err}");
    // A small set that the rule would chain into conversations longer than the pass (each
    // record a third of one, within the context) trains each record alone, and says why.
    let third = "Fact? ".repeat(most / 3 / per_word);
    let records = (0..12).map(|i| serde_json::json!({"instruction": third, "output": format!("It is {i}.")}));
    let data = load(records.map(|r| r.to_string()).collect(), 2 * most - 8);
    let chains = data.rounds.iter().flatten().map(|s| s.ids.len()).max().expect("chained");
    assert!(chains > most && chains < 2 * most, "conversations of {chains} tokens");
    let t = Trainer::new(model.clone(), &data, cfg.clone()).expect("records alone");
    let why = &t.chosen().iter().find(|c| c.setting == "data.chain").expect("chain chosen").why;
    assert_eq!(t.config().data.chain, Some(1), "{why}");
    assert!(why.contains(&format!("reach {chains} tokens, over the {most} this GPU trains in one pass")), "{why}");
    let err = err_of(Trainer::new(model, &facts, TrainConfig { batch_tokens: Some(most + 64), ..cfg }));
    assert!(err.contains("batch_tokens") && err.contains(&format!("at most {most}")), "{err}");
}

/// Every position's logits of a text longer than one binding holds (500 rows of a 320-token
/// vocabulary on a device opened to bind 256 KiB: 204 rows a binding) are formed and read back
/// in chunks of rows, and equal those of the same model on the adapter's own limit bit for bit
/// (the same kernels over the same rows: one forward pass and one chunk of the tables on
/// either); its losses too.
#[test]
fn logits_past_one_binding_are_formed_in_chunks_of_rows() {
    use edgetune::gpu::{GpuContext, GpuOptions};
    use edgetune::model::llama::{LoadOptions, Quant};
    let opts = LoadOptions { quant: Quant::Nf4, max_context: 512, ..Default::default() };
    let small =
        GpuContext::new(&GpuOptions { max_storage_binding: Some(256 << 10), ..Default::default() }).expect("gpu");
    let narrow = random_llama_on(std::sync::Arc::new(small), "narrow-binding", (64, 128, 2, 1, 32), 512, &opts);
    let narrow = narrow.expect("model");
    let wide = random_llama("wide-binding", (64, 128, 2, 1, 32), 512, &opts).expect("model");
    assert_eq!(narrow.logit_rows(), (256 << 10) / (320 * 4));
    assert!(narrow.max_pass_tokens(0, 0) >= 500, "one forward pass");
    let ids: Vec<u32> = (0..500).map(|i| (i * 11 % 320) as u32).collect();
    let got = narrow.all_logits(&ids).expect("logits in chunks");
    assert_eq!(got.len(), 500 * 320);
    assert!(got == wide.all_logits(&ids).expect("logits"), "logits in chunks differ");
    let losses = narrow.token_losses_with(&ids, None).expect("losses in chunks");
    assert!(losses == wide.token_losses_with(&ids, None).expect("losses"), "losses in chunks differ");
}

/// Caches decoded together share a pool as far as one binding holds them: on a device opened to
/// bind 256 KiB (1,024 positions of this model's keys), four caches of 350 positions make two
/// pools of two, so a rows step over two caches of different pools records two dispatches a
/// layer more (their keys' writing and their attention) than over two of one pool, and gives
/// the same picks; a cache past one binding is refused naming max_context and the most that
/// fits, and so is a model whose RoPE table (2,048 positions of 32 floats here) would be.
#[test]
fn pools_of_caches_hold_what_one_binding_holds() {
    use edgetune::gpu::{GpuContext, GpuOptions};
    use edgetune::lora::GpuAdapterSet;
    use edgetune::model::llama::{DecodeRow, KvCache, LoadOptions, Quant, RowToken};
    let small = std::sync::Arc::new(
        GpuContext::new(&GpuOptions { max_storage_binding: Some(256 << 10), ..Default::default() }).expect("gpu"),
    );
    let opts = |max_context| LoadOptions { quant: Quant::None, max_context, ..Default::default() };
    let dims = (64, 128, 2, 2, 32);
    let err = err_of(random_llama_on(small.clone(), "long-rope", dims, 4096, &opts(4096)));
    assert!(err.contains("max_context") && err.contains("RoPE table") && err.contains("(at most 2048)"), "{err}");
    let m = random_llama_on(small, "pooled-caches", dims, 2048, &opts(2048)).expect("model");
    let set = GpuAdapterSet::new(&m.ctx, &[], m.config.num_layers).expect("set");
    let mut decoder = m.rows_decoder(2, 1).expect("decoder");
    let mut caches = m.new_caches_for(&[350; 4]).expect("caches");
    let mut step = |pair: [&mut KvCache; 2]| {
        let mut rows: Vec<DecodeRow<'_>> = pair
            .into_iter()
            .zip([5, 9])
            .map(|(cache, token)| DecodeRow { cache, adapter: None, token: RowToken::Id(token) })
            .collect();
        let before = m.ctx.counts();
        let picked = m.decode_rows_argmax(&mut decoder, &set, &mut rows).expect("step");
        ((m.ctx.counts() - before).dispatches, picked)
    };
    let [c0, c1, c2, c3] = &mut caches[..] else { panic!("four caches") };
    let (one_pool, picked) = step([&mut *c0, c1]);
    let (two_pools, picked_apart) = step([&mut *c2, c3]);
    assert_eq!(two_pools, one_pool, "caches 2 and 3 share the second pool");
    assert_eq!(picked, picked_apart);
    let (across, _) = step([c0, c2]);
    assert_eq!(across, one_pool + 2 * m.config.num_layers as u64, "caches 0 and 2 are in different pools");
    let err = err_of(m.new_caches_for(&[1024, 1025]));
    assert!(err.contains("a KV cache of 1025 tokens") && err.contains("max_context"), "{err}");
    assert!(err.contains("(at most 1024)"), "{err}");
}

/// The kernels bind an adapter's buffer whole (and training its gradients and AdamW moments,
/// each as large), so an adapter past `max_storage_buffer_binding_size` is refused by
/// `Trainer::new` before the adapter is made, naming lora.r and the most rank that fits.
#[test]
fn an_adapter_past_the_gpus_binding_is_refused_naming_the_rank() {
    use edgetune::lora::{Layout, LoraConfig};
    use edgetune::model::llama::{LoadOptions, Quant};
    use edgetune::train::{TrainConfig, Trainer};
    // A 131,072-wide MLP: a rank of LoRA on all seven modules takes 3 x (64 + 131,072) floats and
    // a few hundred more, so the binding is passed below edgetune's largest rank on any GPU.
    let opts = LoadOptions { quant: Quant::Nf4, max_context: 256, ..Default::default() };
    let model = random_llama("wide-lora", (64, 131072, 2, 1, 32), 4096, &opts).expect("wide");
    let per_rank = Layout::new(&model.config, &LoraConfig { r: 1, ..Default::default() }).expect("layout").len;
    let binding = model.ctx.limits.max_storage_buffer_binding_size as usize;
    let most = binding / 4 / per_rank;
    assert!(most < edgetune::lora::MAX_RANK, "a rank past {binding} bytes is more than edgetune takes");
    let fits = Layout::new(&model.config, &LoraConfig { r: most, ..Default::default() }).expect("layout");
    model.check_adapter_binds(&fits).expect("the most that fits");
    let tok = Tokenizer::open(&common::fixtures().join("tiny_llama")).expect("tokenizer");
    let records = vec![serde_json::json!({"instruction": "Fact?", "output": "It is."}).to_string()];
    let source = edgetune::data::Source::Records { name: "facts".into(), records };
    let data = edgetune::data::load_sources(&[source], &tok, &Default::default()).expect("data");
    let lora = LoraConfig { r: most + 1, ..Default::default() };
    let cfg = TrainConfig { lora, max_steps: Some(1), ..Default::default() };
    let err = err_of(Trainer::new(std::sync::Arc::new(model), &data, cfg));
    for part in [format!("rank {}", most + 1), format!("lower lora.r (at most {most}"), "max_storage_buffer".into()] {
        assert!(err.contains(&part), "{part}: {err}");
    }
}
