//! LoRA training parity with Hugging Face PEFT on tiny random Llama and Qwen2 models (fixtures
//! written by tests/reference/generate.py): adapters saved by PEFT load here, and one forward
//! and backward over a padded, prompt-masked batch gives PEFT's loss and LoRA gradients.

mod common;

use std::sync::Arc;

use common::{Fixture, assert_close, fixtures, gpus};
use edgetune::gpu::{GpuContext, GpuOptions};
use edgetune::lora::{GpuAdapter, Layout, peft};
use edgetune::model::llama::{LoadOptions, Model, Quant};
use edgetune::model::training::{Batch, Precision, WorkspacePlan};

fn ctx() -> Arc<GpuContext> {
    Arc::new(GpuContext::new(&GpuOptions::default()).unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}")))
}

/// The rows of a right-padded (B, L) batch as packed samples: the tokens under the attention
/// mask, trained where the label is not -100.
fn batch(fx: &Fixture, name: &str) -> Batch {
    let shape = fx.shape(&format!("{name}.ids"));
    let (ids, mask, labels) =
        (fx.i64(&format!("{name}.ids")), fx.i64(&format!("{name}.mask")), fx.i64(&format!("{name}.labels")));
    let mut samples: Vec<(Vec<u32>, Vec<bool>)> = Vec::new();
    for r in 0..shape[0] {
        let row = r * shape[1]..(r + 1) * shape[1];
        let n = mask[row.clone()].iter().filter(|&&m| m == 1).count();
        let start = row.start;
        samples.push((
            ids[start..start + n].iter().map(|&i| i as u32).collect(),
            labels[start..start + n].iter().map(|&l| l != -100).collect(),
        ));
    }
    Batch::pack(samples.iter().map(|(i, t)| (&i[..], &t[..]))).expect("pack")
}

/// What a family's arithmetic adds to the f32 tolerances, as a share of the compared value's
/// scale: nothing where every product is f32. The coop16 family rounds the operands of the
/// products through frozen weights (and the LoRA forward products) to f16, so each product is
/// off by up to 2u of its mass (u = 2^-11; gpu/probe.rs); the half family also sums them in f16
/// over runs of 8, up to 10u (`common::f16_slack`). A value passes through at most `depth` such
/// products in series, each error carried on through the ones after it, so up to that times
/// depth. Counted per layer: q/k/v, LoRA B, o, LoRA B, gate/up, LoRA B, down, LoRA B forward
/// (8) and o, q/k/v, down, gate/up backward (4), and lm_head both ways.
fn f16_share(ctx: &GpuContext, depth: usize) -> f32 {
    common::f16_products(ctx).per_product() * depth as f32
}

/// Serial f16 products of a fixture of `layers` layers: forward to the loss.
fn forward_depth(layers: usize) -> usize {
    layers * 8 + 1
}

/// Serial f16 products to a gradient: the forward, lm_head's dX and each layer's backward.
fn gradient_depth(layers: usize) -> usize {
    forward_depth(layers) + 1 + layers * 4
}

/// Runs `f` on a context of every kernel family the adapter can run.
fn in_every_family(f: impl Fn(Arc<GpuContext>)) {
    for ctx in gpus() {
        eprintln!("kernels: {}", ctx.report.kernels);
        f(ctx);
    }
}

fn one_step(kind: &str) {
    in_every_family(|ctx| one_step_on(ctx, kind));
}

fn one_step_on(ctx: Arc<GpuContext>, kind: &str) {
    let fx = Fixture::open(&format!("peft_{kind}_expected.safetensors"));
    let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
    let model = Model::open(ctx, &fixtures().join(format!("tiny_{kind}")), &opts).expect("tiny model loads");
    let adapter =
        peft::load(&fixtures().join(format!("peft_{kind}_adapter")), &model.config).expect("PEFT adapter loads");
    assert_eq!(adapter.layout.r, 4);
    let layers = model.config.num_layers;
    let per_layer = edgetune::lora::Module::adaptable(&model.config).len();
    assert_eq!(adapter.layout.slots.len(), per_layer * layers, "all-linear on {layers} layers");
    assert_eq!(adapter.config.use_rslora, kind == "qwen2");
    let gpu = GpuAdapter::upload(&model.ctx, &adapter);
    let b = batch(&fx, "a");
    let ws = model.workspace(WorkspacePlan::new(b.len(), 4)).expect("workspace");
    let grads = model.ctx.storage_zeroed("grads", adapter.layout.len);
    let n = b.n_scored();
    let mut enc = model.ctx.encoder();
    model.forward_backward(&mut enc, &ws, &b, &gpu, &grads, 1.0 / n as f32).expect("forward/backward");
    model.ctx.submit([enc.finish()]);
    let losses = model.ctx.read_f32(&ws.loss, b.len()).expect("loss");
    let loss = losses.iter().map(|&l| f64::from(l)).sum::<f64>() / n as f64;
    let want: f64 = fx.metadata("loss").parse().expect("loss");
    eprintln!("{kind}: loss {loss} vs PEFT {want}");
    let loss_tol = 1e-4 + f64::from(f16_share(&model.ctx, forward_depth(layers)));
    assert!((loss - want).abs() <= loss_tol * want.abs(), "{kind}: loss {loss} vs PEFT {want}");
    let grad_share = f16_share(&model.ctx, gradient_depth(layers));
    let g = model.ctx.read_f32(&grads, adapter.layout.len).expect("grads");
    let mut worst = 0f32;
    for s in &adapter.layout.slots {
        for (is_b, off, len) in [(false, s.a, 4 * s.n_in), (true, s.b, s.n_out * 4)] {
            let key = adapter.layout.peft_key(s, is_b);
            let want = fx.f32(&format!("grad.{key}"));
            let got = &g[off..off + len];
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            worst = worst.max(err / scale);
            // Same maths in f32 on both sides; what differs is summation order over the batch
            // (M <= 40 tokens) and the hidden sizes (<= 128), a few ulps of the largest terms:
            // 1e-4 relative, with a floor of 1e-4 of the tensor's largest gradient for the
            // entries near zero. The f16 products add their share of the largest gradient.
            assert_close(&key, got, &want, 1e-4, (1e-4 + grad_share) * scale);
        }
    }
    eprintln!("{kind}: worst gradient error {worst:e} of the tensor's largest gradient");
}

#[test]
fn llama_lora_loss_and_gradients_match_peft() {
    one_step("llama");
}

#[test]
fn qwen2_rslora_loss_and_gradients_match_peft() {
    one_step("qwen2");
}

/// Mistral's sliding window (4 keys) in the backward pass too, in every kernel family.
#[test]
fn mistral_sliding_window_lora_loss_and_gradients_match_peft() {
    one_step("mistral");
}

/// Gemma 3: gradients back through its norms after the MLP and attention, GeGLU, the q/k norms
/// and the two RoPE tables, in every kernel family.
#[test]
fn gemma3_lora_loss_and_gradients_match_peft() {
    one_step("gemma3");
}

/// Gemma 3 with its own heads of 256 dims, which the tiled families' attention accumulates
/// 128 dims at a time and simd8 runs unrolled for 256: the loss and gradients of one step, in
/// every kernel family.
#[test]
fn gemma3_with_256_dim_heads_lora_loss_and_gradients_match_peft() {
    one_step("gemma3_wide");
}

/// Gemma 2: gradients back through both soft caps (the final logits' in the cross-entropy's
/// backward, the attention scores' in every attention kernel), the sandwich norms, GeGLU and
/// the alternating window, in every kernel family.
#[test]
fn gemma2_lora_loss_and_gradients_match_peft() {
    one_step("gemma2");
}

/// Phi-3: one adapter on the fused qkv_proj (its A shared by q, k and v, its B their rows) and
/// one on gate_up_proj, as PEFT puts them.
/// PEFT on the language model of a multimodal Gemma 3 (`Gemma3ForConditionalGeneration`, its
/// keys under `model.language_model.layers`), none on its vision tower.
#[test]
fn multimodal_gemma3_lora_loss_and_gradients_match_peft() {
    one_step("gemma3_mm");
}

#[test]
fn multimodal_gemma3_ten_step_adamw_curve_matches_peft() {
    curve("gemma3_mm", false);
}

/// An adapter on a multimodal Gemma 3 saved by edgetune is PEFT's folder again: the same keys
/// (under `model.language_model.layers`) with the same values, and `target_modules` the same
/// regex over the language model's modules (a list of names would also match the vision
/// tower's q_proj, k_proj, v_proj, fc1, ...).
#[test]
fn a_multimodal_gemma3_adapter_saved_by_edgetune_is_the_peft_folder_it_loaded() {
    let (cfg, _) = edgetune::model::open_weights(&fixtures().join("tiny_gemma3_mm")).expect("folder");
    assert!(cfg.multimodal);
    let theirs = fixtures().join("peft_gemma3_mm_adapter");
    let adapter = peft::load(&theirs, &cfg).expect("PEFT's adapter loads");
    let dir = std::env::temp_dir().join(format!("edgetune-mm-adapter-{}", std::process::id()));
    peft::save(&dir, &adapter, "tiny_gemma3_mm").expect("save");
    let read = |d: &std::path::Path| std::fs::read(d.join(peft::WEIGHTS_FILE)).expect("weights");
    let (ours_bytes, theirs_bytes) = (read(&dir), read(&theirs));
    let ours = safetensors::SafeTensors::deserialize(&ours_bytes).expect("ours");
    let peft_file = safetensors::SafeTensors::deserialize(&theirs_bytes).expect("PEFT's");
    let names = |st: &safetensors::SafeTensors| {
        let mut n: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        n.sort();
        n
    };
    assert_eq!(names(&ours), names(&peft_file));
    for name in names(&peft_file) {
        assert_eq!(ours.tensor(&name).expect("ours").data(), peft_file.tensor(&name).expect("PEFT's").data(), "{name}");
    }
    let config = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join(peft::CONFIG_FILE)).expect("config")).expect("JSON")
    };
    assert_eq!(config(&dir)["target_modules"], config(&theirs)["target_modules"]);
    // With LoRA on the vision tower too (PEFT's `all-linear` on the whole model), the adapter
    // is refused, naming a vision tensor: edgetune trains the text model only.
    let bytes = std::fs::read(theirs.join(peft::WEIGHTS_FILE)).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("PEFT's");
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().map(|(n, v)| (n.to_string(), v)).collect();
    let a = vec![0u8; 4 * 4 * 32];
    let vision = "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight";
    views.push((
        vision.into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 32], &a).expect("view"),
    ));
    std::fs::write(dir.join(peft::WEIGHTS_FILE), safetensors::tensor::serialize(views, None).expect("serialize"))
        .expect("write");
    let e = peft::load(&dir, &cfg).expect_err("vision LoRA refused").to_string();
    assert!(e.contains(vision) && e.contains(peft::WEIGHTS_FILE), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn phi3_fused_projection_lora_loss_and_gradients_match_peft() {
    one_step("phi3");
}

/// The gradients back through partial LongRoPE (Phi-4-mini's RoPE on a tiny Phi-3).
#[test]
fn phi3_partial_longrope_lora_loss_and_gradients_match_peft() {
    one_step("phi4");
}

/// Qwen3: the gradients pass back through the per-head q/k norms to q_proj and k_proj.
#[test]
fn qwen3_lora_loss_and_gradients_match_peft() {
    one_step("qwen3");
}

/// 10 AdamW steps (lr 1e-2 constant, weight decay 0.01, clipping at norm 1) over two
/// alternating batches, against PEFT + torch.optim.AdamW on the same adapter.
fn curve(kind: &str, checkpointing: bool) {
    in_every_family(|ctx| curve_on(ctx, kind, checkpointing));
}

fn curve_on(ctx: Arc<GpuContext>, kind: &str, checkpointing: bool) {
    use edgetune::train::optimizer::{AdamwConfig, Optimizer};
    let fx = Fixture::open(&format!("peft_{kind}_expected.safetensors"));
    let want_losses: Vec<f64> = serde_json::from_str(&fx.metadata("curve")).expect("curve");
    let want_norms: Vec<f64> = serde_json::from_str(&fx.metadata("grad_norms")).expect("norms");
    let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
    let model = Model::open(ctx, &fixtures().join(format!("tiny_{kind}")), &opts).expect("tiny model loads");
    let adapter = peft::load(&fixtures().join(format!("peft_{kind}_adapter")), &model.config).expect("adapter");
    let gpu = GpuAdapter::upload(&model.ctx, &adapter);
    let batches = [batch(&fx, "a"), batch(&fx, "b")];
    let cap = batches.iter().map(Batch::len).max().unwrap_or(1);
    let ws = model.workspace(WorkspacePlan { checkpointing, ..WorkspacePlan::new(cap, 4) }).expect("workspace");
    let cfg = AdamwConfig { weight_decay: 0.01, max_grad_norm: 1.0, ..Default::default() };
    let mut opt = Optimizer::new(&model.ctx, adapter.layout.len, cfg).expect("optimizer");
    for step in 0..10 {
        let b = &batches[step % 2];
        let mut enc = model.ctx.encoder();
        opt.zero_grad(&mut enc);
        model.forward_backward(&mut enc, &ws, b, &gpu, &opt.grads, 1.0 / b.n_scored() as f32).expect("fwd/bwd");
        opt.record_step(&model.ctx, &mut enc, &gpu.params, 1e-2).expect("adamw");
        model.ctx.submit([enc.finish()]);
        let loss = model.ctx.read_f32(&ws.loss, b.len()).expect("loss").iter().map(|&l| f64::from(l)).sum::<f64>()
            / b.n_scored() as f64;
        let norm = model.ctx.read_f32(&opt.norm, 1).expect("norm")[0];
        let applied = model.ctx.read_f32(&opt.applied, 1).expect("update count")[0].to_bits();
        assert_eq!(applied, step as u32 + 1, "every step applied and counted on the GPU");
        let (wl, wn) = (want_losses[step], want_norms[step]);
        eprintln!("{kind} step {step}: loss {loss:.7} (PEFT {wl:.7}), grad norm {norm:.6} (PEFT {wn:.6})");
        // The bound: 1e-3 relative per step. Observed differences are ~1e-6: the same
        // f32 maths, summed in other orders.
        // The f16 products add their share (see f16_share).
        let (loss_tol, norm_tol) = (
            1e-3 + f64::from(f16_share(&model.ctx, forward_depth(model.config.num_layers))),
            1e-3 + f64::from(f16_share(&model.ctx, gradient_depth(model.config.num_layers))),
        );
        assert!((loss - wl).abs() <= loss_tol * wl.abs(), "{kind} step {step}: loss {loss} vs PEFT {wl}");
        assert!((f64::from(norm) - wn).abs() <= norm_tol * wn, "{kind} step {step}: grad norm {norm} vs PEFT {wn}");
    }
    let trained = gpu.download(&model.ctx).expect("download");
    let mut worst = 0f32;
    for s in &trained.layout.slots {
        for (is_b, off, len) in [(false, s.a, 4 * s.n_in), (true, s.b, s.n_out * 4)] {
            let want = fx.f32(&format!("trained.{}", adapter.layout.peft_key(s, is_b)));
            for (a, b) in trained.params[off..off + len].iter().zip(&want) {
                let d = (a - b).abs();
                worst = if d.is_nan() { f32::INFINITY } else { worst.max(d) };
            }
        }
    }
    eprintln!("{kind}: max parameter difference after 10 steps {worst:e}");
    // Each AdamW update moves a parameter by at most about lr = 1e-2; the updates follow the
    // sign of m / sqrt(v), so they agree wherever the gradients do. 1e-4 is 1% of one step.
    // With f16 products, a gradient within their error of zero can take the other sign, and
    // that parameter then moves the other way: up to 2 lr a step apart (the loss curve above
    // is what shows the training agrees).
    let bound = if f16_share(&model.ctx, 1) > 0.0 { 2.0 * 1e-2 * 10.0 } else { 1e-4 };
    assert!(worst <= bound, "{kind}: parameters after 10 steps differ from PEFT's by {worst}");
}

#[test]
fn llama_ten_step_adamw_curve_matches_peft() {
    curve("llama", false);
}

/// An adapter with 16 KiB of workgroup memory (Vulkan's minimum, WebGPU's default) gets tile128
/// with every product on its 64 x 64 blocks (tile64) and attention on portable's kernels, and
/// its context refuses any kernel past that limit: ten steps there, with gradient
/// checkpointing, follow PEFT's curve, so nothing a step records needs more.
#[test]
fn llama_ten_step_adamw_curve_matches_peft_in_16_kib_of_workgroup_memory() {
    curve_on(common::small_workgroup_gpu(), "llama", true);
}

#[test]
fn qwen2_ten_step_adamw_curve_matches_peft_with_gradient_checkpointing() {
    curve("qwen2", true);
}

#[test]
fn gemma3_ten_step_adamw_curve_matches_peft_with_gradient_checkpointing() {
    curve("gemma3", true);
}

#[test]
fn gemma3_with_256_dim_heads_ten_step_adamw_curve_matches_peft() {
    curve("gemma3_wide", false);
}

#[test]
fn gemma2_ten_step_adamw_curve_matches_peft_with_gradient_checkpointing() {
    curve("gemma2", true);
}

#[test]
fn phi3_ten_step_adamw_curve_matches_peft() {
    curve("phi3", false);
}

/// Phi-3's merge writes W + scale B A into the fused qkv_proj and gate_up_proj.
#[test]
fn phi3_merge_gives_the_adapted_logits() {
    merged_logits("phi3");
}

#[test]
fn mistral_ten_step_adamw_curve_matches_peft() {
    curve("mistral", false);
}

#[test]
fn qwen3_ten_step_adamw_curve_matches_peft_with_gradient_checkpointing() {
    curve("qwen3", true);
}

/// The tiny Llama with its weights as NF4, PEFT's adapter for it (on the CPU and uploaded) and
/// the fixture's batch "b".
fn nf4_llama_with_peft_adapter() -> (Model, edgetune::lora::Adapter, GpuAdapter, Batch) {
    let fx = Fixture::open("peft_llama_expected.safetensors");
    let opts = LoadOptions { quant: Quant::Nf4, ..Default::default() };
    let model = Model::open(ctx(), &fixtures().join("tiny_llama"), &opts).expect("tiny model loads");
    let adapter = peft::load(&fixtures().join("peft_llama_adapter"), &model.config).expect("adapter");
    let gpu = GpuAdapter::upload(&model.ctx, &adapter);
    (model, adapter, gpu, batch(&fx, "b"))
}

/// The backward pass reads what the forward pass kept instead of computing it again: each
/// adapted module's x A^T (no forward product in the backward pass at all: a step records as
/// many as the forward pass alone, the 4 x A^T products a layer, each module's B product being
/// summed by its base product), and down_proj's dA reads act(gate) * up
/// through the op, so that only the forward pass runs the gate kernel (once a layer); the dA
/// of the modules after the two norms read the normed rows through the norm with the 1 / rms
/// the forward pass kept, so that only it norms (twice a layer, and the final norm once). With
/// checkpointing the forward pass runs twice, so twice of each of these.
#[test]
fn a_training_step_reads_the_lora_products_its_forward_pass_kept_and_the_gate_and_norms_through_the_op() {
    use edgetune::gpu::Timer;
    let (model, adapter, gpu, b) = nf4_llama_with_peft_adapter();
    let layers = model.config.num_layers;
    // Dispatches of the dense forward products (the LoRA ones: the base is NF4, the head f16),
    // of the gate kernel and of the norms, in one recorded pass.
    let count = |ckpt: bool, step: bool| {
        let plan = WorkspacePlan { checkpointing: ckpt, ..WorkspacePlan::new(b.len(), 4) };
        let ws = model.workspace(plan).expect("workspace");
        let grads = model.ctx.storage_zeroed("grads", adapter.layout.len);
        model.ctx.start_profiling(Timer::WallClock);
        let mut enc = model.ctx.encoder();
        if step {
            model.forward_backward(&mut enc, &ws, &b, &gpu, &grads, 1.0).expect("fwd/bwd");
        } else {
            model.forward_loss(&mut enc, &ws, &b, &gpu).expect("forward");
        }
        model.ctx.submit([enc.finish()]);
        let kernels = model.ctx.stop_profiling().expect("profile");
        let of =
            |f: &dyn Fn(&str) -> bool| kernels.iter().filter(|(n, _)| f(n)).map(|(_, t)| t.dispatches).sum::<u64>();
        let dense = of(&|n| ["matmul", "matmul_simd8", "matmul_t128"].contains(&n.split('.').next().unwrap_or(n)));
        (dense, of(&|n| n == "silu_mul"), of(&|n| n.split('.').next() == Some("rms_norm")))
    };
    let per_layer = 4 * layers as u64;
    let layers = layers as u64;
    assert_eq!(count(false, false), (per_layer, layers, 2 * layers + 1), "the forward pass");
    assert_eq!(count(false, true), (per_layer, layers, 2 * layers + 1), "a step");
    assert_eq!(count(true, true), (2 * per_layer, 2 * layers, 4 * layers + 1), "a step with checkpointing");
}

#[test]
fn gradient_checkpointing_gives_bit_identical_gradients() {
    let (model, adapter, gpu, b) = nf4_llama_with_peft_adapter();
    let run = |ckpt: bool| {
        let ws = model
            .workspace(WorkspacePlan { checkpointing: ckpt, ..WorkspacePlan::new(b.len(), 4) })
            .expect("workspace");
        let grads = model.ctx.storage_zeroed("grads", adapter.layout.len);
        let mut enc = model.ctx.encoder();
        model.forward_backward(&mut enc, &ws, &b, &gpu, &grads, 1.0 / b.n_scored() as f32).expect("fwd/bwd");
        model.ctx.submit([enc.finish()]);
        (
            model.ctx.read_f32(&grads, adapter.layout.len).expect("grads"),
            model.ctx.read_f32(&ws.loss, b.len()).expect("loss"),
            ws.bytes,
        )
    };
    let (g0, l0, bytes_off) = run(false);
    let (g1, l1, bytes_on) = run(true);
    assert!(g0.iter().any(|&g| g != 0.0));
    assert_eq!(l0, l1, "losses differ with checkpointing");
    assert_eq!(g0, g1, "gradients differ with checkpointing");
    assert!(bytes_on < bytes_off, "checkpointing should need less memory ({bytes_on} vs {bytes_off})");
}

/// The other direction: an adapter edgetune trained and saved (`edgetune_qwen2_adapter`, rsLoRA)
/// loaded by PEFT gives the logits that edgetune gives with it (fixture written by PEFT).
#[test]
fn peft_loading_an_adapter_saved_by_edgetune_gives_edgetunes_logits() {
    let fx = Fixture::open("edgetune_qwen2_adapter_expected.safetensors");
    let ids: Vec<u32> = fx.i64("ids").iter().map(|&i| i as u32).collect();
    let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
    let model = Model::open(ctx(), &fixtures().join("tiny_qwen2"), &opts).expect("tiny model loads");
    let dir = fixtures().join("edgetune_qwen2_adapter");
    let adapter = peft::load(&dir, &model.config).expect("adapter loads");
    assert!(adapter.config.use_rslora);

    // The committed folder is what edgetune's save writes: saving it again gives the same bytes.
    let again = std::env::temp_dir().join(format!("edgetune-resave-{}", std::process::id()));
    peft::save(&again, &adapter, "tiny_qwen2").expect("save");
    for f in [peft::WEIGHTS_FILE, peft::CONFIG_FILE] {
        let read = |d: &std::path::Path| std::fs::read(d.join(f)).expect("adapter file");
        assert_eq!(read(&dir), read(&again), "{f} differs after a load/save round trip");
    }

    let gpu = GpuAdapter::upload(&model.ctx, &adapter);
    let got = model.all_logits_with(&ids, Some(&gpu)).expect("logits");
    // The same f32 maths as the model parity tests, summed in other orders: 1e-4 is far above
    // the ~1e-6 rounding of sums of a few hundred products, and far below the adapter's effect.
    assert_close("edgetune vs PEFT logits with the adapter", &got, &fx.f32("peft"), 1e-4, 1e-4);
    assert_close("PEFT's merged model", &got, &fx.f32("merged"), 1e-4, 1e-4);
    let moved = got.iter().zip(fx.f32("base")).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved > 0.5, "the adapter barely changes the logits ({moved}), so this test would prove nothing");
}

/// Largest |a - b| over two equally long slices.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// `merge` writes W + scale * B A as f16 or bf16: edgetune loading the merged folder gives PEFT's
/// merged logits up to the rounding of the stored weights, from a Hugging Face folder and from a
/// GGUF base (whose config.json and tokenizer files are written from its metadata).
#[test]
fn merged_adapters_give_the_adapted_logits() {
    use edgetune::lora::merge::{MergeDtype, merge};
    let fx = Fixture::open("edgetune_qwen2_adapter_expected.safetensors");
    let ids: Vec<u32> = fx.i64("ids").iter().map(|&i| i as u32).collect();
    let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
    let base = fixtures().join("tiny_qwen2");
    let cfg = edgetune::model::open_weights(&base).expect("config").0;
    let adapter = peft::load(&fixtures().join("edgetune_qwen2_adapter"), &cfg).expect("adapter");
    let out = std::env::temp_dir().join(format!("edgetune-merge-{}", std::process::id()));
    let want = fx.f32("merged");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (dtype, eps) in [(MergeDtype::F16, 2f32.powi(-11)), (MergeDtype::Bf16, 2f32.powi(-8))] {
        let dir = out.join(format!("{dtype:?}"));
        assert_eq!(merge(&base, &adapter, &dir, dtype).expect("merge"), 1);
        let merged = Model::open(ctx(), &dir, &opts).expect("merged folder loads");
        let got = merged.all_logits(&ids).expect("logits");
        // Every stored weight moves by at most eps relative; through two layers and the head
        // that moves each logit by a few eps of the logit scale. 16 eps is a loose ceiling that
        // a wrong merge (a missing or doubled delta moves logits by ~2.5) cannot meet.
        let d = max_diff(&got, &want);
        eprintln!("{dtype:?}: max logit difference {d:e} (scale {scale}, eps {eps:e})");
        assert!(d <= 16.0 * eps * scale, "{dtype:?} merged logits differ by {d}");
    }

    // A GGUF base: the tiny Llama as llama.cpp's converter writes it, with a PEFT adapter.
    let gguf = fixtures().join("tiny_llama_spm.gguf");
    let cfg = edgetune::model::open_weights(&gguf).expect("config").0;
    let adapter = peft::load(&fixtures().join("peft_llama_adapter"), &cfg).expect("adapter");
    let dir = out.join("from_gguf");
    merge(&gguf, &adapter, &dir, MergeDtype::F16).expect("merge");
    let tok_gguf = edgetune::tokenizer::Tokenizer::open(&gguf).expect("GGUF tokenizer");
    let tok_dir = edgetune::tokenizer::Tokenizer::open(&dir).expect("written tokenizer files load");
    let text = "Paris is the capital of France.";
    assert_eq!(tok_gguf.encode(text).expect("ids"), tok_dir.encode(text).expect("ids"));
    assert_eq!(tok_gguf.chat_template, tok_dir.chat_template);
    let ids = tok_gguf.encode_prompt(text).expect("ids");
    let unmerged = Model::open(ctx(), &gguf, &opts).expect("GGUF loads");
    let gpu = GpuAdapter::upload(&unmerged.ctx, &adapter);
    let want = unmerged.all_logits_with(&ids, Some(&gpu)).expect("logits");
    let base_logits = unmerged.all_logits(&ids).expect("logits");
    let merged = Model::open(ctx(), &dir, &opts).expect("merged folder loads");
    let got = merged.all_logits(&ids).expect("logits");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_diff(&got, &want);
    eprintln!("from GGUF: max logit difference {d:e}; the adapter moves logits by {}", max_diff(&want, &base_logits));
    assert!(d <= 16.0 * 2f32.powi(-11) * scale, "merged-from-GGUF logits differ by {d}");
    assert!(max_diff(&want, &base_logits) > 100.0 * d, "the adapter must matter for this test to mean anything");
}

/// A multimodal Gemma 3 merged to a folder is the folder again with the adapter in its text
/// model: every tensor under the name it was stored under (so transformers loads it as it
/// loaded the original), the vision tower's and projector's bytes unchanged (f32), its
/// tokenizer files beside it, and its text model giving the adapted logits.
#[test]
fn a_multimodal_gemma3_merged_to_a_folder_keeps_its_vision_tower_and_gives_the_adapted_logits() {
    use edgetune::lora::merge::{MergeDtype, merge};
    let base = fixtures().join("tiny_gemma3_mm");
    let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
    let model = Model::open(ctx(), &base, &opts).expect("tiny model loads");
    let adapter = peft::load(&fixtures().join("peft_gemma3_mm_adapter"), &model.config).expect("adapter");
    let dir = std::env::temp_dir().join(format!("edgetune-merge-mm-{}", std::process::id()));
    assert_eq!(merge(&base, &adapter, &dir, MergeDtype::F32).expect("merge"), 1);
    let read = |d: &std::path::Path| std::fs::read(d.join("model.safetensors")).expect("weights");
    let (before, after) = (read(&base), read(&dir));
    let (before, after) = (
        safetensors::SafeTensors::deserialize(&before).expect("base"),
        safetensors::SafeTensors::deserialize(&after).expect("merged"),
    );
    let names = |st: &safetensors::SafeTensors| {
        let mut n: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        n.sort();
        n
    };
    assert_eq!(names(&after), names(&before));
    let vision: Vec<String> = names(&before).into_iter().filter(|n| !n.starts_with("language_model.")).collect();
    assert!(vision.len() > 10, "{vision:?}");
    for n in &vision {
        assert_eq!(after.tensor(n).expect("merged").data(), before.tensor(n).expect("base").data(), "{n}");
    }
    let q = "language_model.model.layers.0.self_attn.q_proj.weight";
    assert_ne!(after.tensor(q).expect("merged").data(), before.tensor(q).expect("base").data(), "{q}");
    assert!(dir.join("tokenizer.json").is_file() && dir.join("config.json").is_file());
    let ids: Vec<u32> = vec![5, 80, 120, 33, 7, 250, 12, 91];
    let gpu = GpuAdapter::upload(&model.ctx, &adapter);
    let want = model.all_logits_with(&ids, Some(&gpu)).expect("adapted");
    let merged = Model::open(ctx(), &dir, &opts).expect("merged folder loads");
    assert!(merged.config.multimodal);
    let got = merged.all_logits(&ids).expect("merged");
    // The same f32 maths, the delta added to W once in f32: a few ulps of the logits.
    assert_close("merged multimodal Gemma 3", &got, &want, 1e-4, 1e-4);
    let moved = max_diff(&want, &model.all_logits(&ids).expect("base"));
    assert!(moved > 0.05, "the adapter moves the logits by only {moved}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Loss and LoRA gradients of one forward/backward over batch "a" with the given workspace.
fn loss_and_grads(kind: &str, plan: impl Fn(usize) -> WorkspacePlan) -> (f64, Vec<f32>, u64) {
    let fx = Fixture::open(&format!("peft_{kind}_expected.safetensors"));
    let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
    let model = Model::open(ctx(), &fixtures().join(format!("tiny_{kind}")), &opts).expect("tiny model loads");
    let adapter = peft::load(&fixtures().join(format!("peft_{kind}_adapter")), &model.config).expect("adapter");
    let gpu = GpuAdapter::upload(&model.ctx, &adapter);
    let b = batch(&fx, "a");
    let ws = model.workspace(plan(b.len())).expect("workspace");
    let grads = model.ctx.storage_zeroed("grads", adapter.layout.len);
    let mut enc = model.ctx.encoder();
    model.forward_backward(&mut enc, &ws, &b, &gpu, &grads, 1.0 / b.n_scored() as f32).expect("fwd/bwd");
    model.ctx.submit([enc.finish()]);
    let loss = model.ctx.read_f32(&ws.loss, b.len()).expect("loss").iter().map(|&l| f64::from(l)).sum::<f64>()
        / b.n_scored() as f64;
    (loss, model.ctx.read_f32(&grads, adapter.layout.len).expect("grads"), ws.bytes)
}

/// f16 activations against the f32 path on the same batch. Storing a value as f16 changes it by
/// at most u = 2^-11 of itself (round to nearest, 11 significant bits). To first order a
/// gradient (or the loss) then moves by at most u times the number of roundings on the path
/// from the input to it, times the path's amplification, which is about 1 for these unit-scale
/// tiny models. The longest path crosses every saved tensor of every layer: the layer input,
/// then q/k/v, the attention output, the residual after attention and gate/up, so 1 + 5 per
/// layer (Qwen3 also saves q and k before their norms: 1 + 6; Gemma 3 those and the attention
/// and MLP outputs before their norms: 1 + 8); with checkpointing only the layer inputs are
/// stored, so 1 per layer. That count times
/// u bounds the relative (L2) change of the gradients and of the loss. A layer's activations
/// read back in the wrong place, or a lost attention statistic, is off by far more.
#[test]
fn f16_activations_stay_within_f16_rounding_of_the_f32_path() {
    const U: f64 = 1.0 / 2048.0;
    for kind in ["llama", "qwen2", "qwen3", "gemma3"] {
        let (saved_per_layer, layers) = match kind {
            "qwen3" => (6.0, 2.0),
            "gemma3" => (8.0, 6.0),
            _ => (5.0, 2.0),
        };
        for checkpointing in [false, true] {
            let f32_plan = |t| WorkspacePlan { checkpointing, ..WorkspacePlan::new(t, 4) };
            let f16_plan = |t| WorkspacePlan { activations: Precision::F16, ..f32_plan(t) };
            let (l32, g32, b32) = loss_and_grads(kind, f32_plan);
            let (l16, g16, b16) = loss_and_grads(kind, f16_plan);
            let roundings = if checkpointing { layers } else { 1.0 + saved_per_layer * layers };
            let norm = |g: &mut dyn Iterator<Item = f32>| g.map(|v| f64::from(v).powi(2)).sum::<f64>().sqrt();
            let rel = norm(&mut g16.iter().zip(&g32).map(|(a, b)| a - b)) / norm(&mut g32.iter().copied());
            let loss_rel = (l16 - l32).abs() / l32;
            eprintln!(
                "{kind}, checkpointing {checkpointing}: loss {l16} vs {l32} (relative {loss_rel:.1e}), \
                 gradients relative {rel:.1e}, bound {:.1e}; workspace {b16} vs {b32} bytes",
                roundings * U
            );
            assert!(g32.iter().any(|&g| g != 0.0), "{kind}: no gradient at all");
            assert!(loss_rel <= roundings * U, "{kind}: f16 loss {l16} vs f32 {l32}");
            assert!(rel <= roundings * U, "{kind}: f16 gradients differ by {rel:e} of their norm");
            assert!(rel > 0.0, "{kind}: f16 activations changed nothing, so they were not rounded");
            assert!(b16 < b32, "{kind}: f16 activations should need less memory ({b16} vs {b32})");
        }
    }
}

/// Qwen3 with PEFT's adapter: edgetune's logits with the adapter applied are PEFT's, and the
/// folder `merge` writes (with the q/k norms and `head_dim` in its config.json) gives PEFT's
/// merge_and_unload logits; merged from the GGUF base too.
#[test]
fn qwen3_adapter_and_its_merge_give_pefts_logits() {
    merged_logits("qwen3");
}

/// Gemma 3's merge: the norms written back as w (not 1 + w), the post-attention and post-MLP
/// norms, and a config.json that says GeGLU, the query scale, the layer types and both RoPE
/// bases; from the folder and from the GGUF base (whose query scale is llama.cpp's).
#[test]
fn gemma3_merge_gives_the_adapted_logits() {
    merged_logits("gemma3");
}

/// Gemma 2's merge: its config.json carries both soft caps and the alternating layer types, so
/// the merged model reads back with the base's config; from the folder and from the GGUF base.
#[test]
fn gemma2_merge_gives_the_adapted_logits() {
    merged_logits("gemma2");
}

fn merged_logits(kind: &str) {
    use edgetune::lora::merge::{MergeDtype, merge};
    let opts = LoadOptions { quant: Quant::None, f16_tables: false, ..Default::default() };
    let base = fixtures().join(format!("tiny_{kind}"));
    let model = Model::open(ctx(), &base, &opts).expect("tiny model loads");
    let adapter = peft::load(&fixtures().join(format!("peft_{kind}_adapter")), &model.config).expect("adapter");
    let gpu = GpuAdapter::upload(&model.ctx, &adapter);
    let merged_fx = fixtures().join(format!("peft_{kind}_merged_expected.safetensors"));
    let (ids, want): (Vec<u32>, Vec<f32>) = if merged_fx.exists() {
        let fx = Fixture::open(&format!("peft_{kind}_merged_expected.safetensors"));
        let ids: Vec<u32> = fx.i64("ids").iter().map(|&i| i as u32).collect();
        let applied = model.all_logits_with(&ids, Some(&gpu)).expect("logits");
        // f32 on both sides, as in the forward parity tests.
        assert_close(&format!("{kind} logits with PEFT's adapter"), &applied, &fx.f32("peft"), 1e-4, 1e-4);
        (ids, fx.f32("merged"))
    } else {
        // The adapter applied unmerged, which the gradient tests hold to PEFT's.
        let ids: Vec<u32> =
            Fixture::open(&format!("tiny_{kind}_expected.safetensors")).i64("ids").iter().map(|&i| i as u32).collect();
        let applied = model.all_logits_with(&ids, Some(&gpu)).expect("logits");
        (ids, applied)
    };
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let moved =
        max_diff(&model.all_logits_with(&ids, Some(&gpu)).expect("logits"), &model.all_logits(&ids).expect("base"));
    let out = std::env::temp_dir().join(format!("edgetune-merge-{kind}-{}", std::process::id()));
    for (name, from) in [("folder", base.clone()), ("GGUF", fixtures().join(format!("tiny_{kind}_bpe.gguf")))] {
        let dir = out.join(name);
        merge(&from, &adapter, &dir, MergeDtype::F16).expect("merge");
        let merged = Model::open(ctx(), &dir, &opts).expect("merged folder loads");
        let source = Model::open(ctx(), &from, &opts).expect("base loads");
        assert_eq!(merged.config, source.config, "{name}: the merged config.json reads back as the base's config");
        let got = merged.all_logits(&ids).expect("logits");
        let want = if name == "folder" {
            want.clone()
        } else {
            // The GGUF base holds quantized blocks: compare with that base and the adapter unmerged.
            source.all_logits_with(&ids, Some(&GpuAdapter::upload(&source.ctx, &adapter))).expect("logits")
        };
        // f16 weights: as in merged_adapters_give_the_adapted_logits, 16 eps of the logit scale.
        let d = max_diff(&got, &want);
        eprintln!("{kind} {name}: merged logits differ by {d:e}; the adapter moves them by {moved}");
        assert!(d <= 16.0 * 2f32.powi(-11) * scale, "{kind} {name}: merged logits differ by {d}");
        assert!(moved > 100.0 * d, "the adapter must matter for this test to mean anything");
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// On Phi-3 the adaptable modules are the fused ones: a list of names in any order lays the
/// adapter out as "all-linear" does (the flat buffer's order is the model's, so checkpoints and
/// imported files line up), and an unfused name is an error that lists what the model has.
#[test]
fn phi3_targets_are_its_fused_modules_in_one_order() {
    use edgetune::lora::{LoraConfig, TargetModules};
    let cfg = edgetune::model::open_weights(&fixtures().join("tiny_phi3")).expect("config").0;
    let all = Layout::new(&cfg, &LoraConfig::default()).expect("all-linear");
    let names = |n: &[&str]| TargetModules::Names(n.iter().map(|s| s.to_string()).collect());
    let listed = LoraConfig {
        target_modules: names(&["down_proj", "gate_up_proj", "qkv_proj", "self_attn.o_proj"]),
        ..Default::default()
    };
    assert_eq!(Layout::new(&cfg, &listed).expect("listed"), all);
    let names_of = |l: &Layout| l.slots.iter().take(4).map(|s| s.module.name()).collect::<Vec<_>>();
    assert_eq!(names_of(&all), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]);
    let q = all.slot(0, edgetune::lora::Module::KProj).expect("k's share of qkv_proj");
    let qkv = all.slots[0];
    assert_eq!(
        (q.a, q.b, q.n_out),
        (qkv.a, qkv.b + all.r * cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
    );
    let unfused = LoraConfig { target_modules: names(&["q_proj"]), ..Default::default() };
    let e = Layout::new(&cfg, &unfused).expect_err("q_proj").to_string();
    assert!(e.contains("q_proj") && e.contains("qkv_proj, o_proj, gate_up_proj, down_proj"), "{e}");
}
