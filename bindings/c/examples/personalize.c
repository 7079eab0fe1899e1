/* A minimal program that embeds edgetune from C: load a model, fine-tune a LoRA adapter on the
 * user's data with a progress line, save it as a PEFT adapter, and answer with it.
 *
 * Build (after `cargo build --release -p edgetune-capi`; the library lands in
 * $CARGO_TARGET_DIR/release, by default ~/.cache/edgetune/target/release):
 *
 *   cc -I bindings/c/include bindings/c/examples/personalize.c \
 *      -L ~/.cache/edgetune/target/release -Wl,-rpath,$HOME/.cache/edgetune/target/release \
 *      -ledgetune -o personalize
 *   ./personalize MODEL.gguf DATA.jsonl OUT_DIR
 */
#include <stdio.h>

#include "edgetune.h"

/* Prints the reason for the last failure of this thread and exits. */
static int fail(const char *what) {
    char msg[1024];
    edgetune_last_error_message(msg, sizeof msg);
    fprintf(stderr, "%s: %s\n", what, msg);
    return 1;
}

/* Training progress: called on the training thread after each step, evaluation, ... */
static void on_event(void *userdata, const edgetune_event *e) {
    (void)userdata;
    if (e->kind == EDGETUNE_EVENT_STEP)
        printf("\rstep %llu/%llu  loss %.3f  %.0f tokens/s  ETA %.0f s   ", (unsigned long long)e->step,
               (unsigned long long)e->total_steps, e->loss, e->tokens_per_s, e->eta_s);
    else if (e->kind == EDGETUNE_EVENT_FINISHED)
        printf("\ntraining %s\n", e->message);
    fflush(stdout);
}

/* Generated text arrives piece by piece; returning 0 would stop generation. */
static int on_token(void *userdata, const char *piece) {
    (void)userdata;
    fputs(piece, stdout);
    fflush(stdout);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL DATA.jsonl OUT_DIR\n", argv[0]);
        return 2;
    }
    edgetune_context *ctx = NULL;
    edgetune_model *model = NULL;
    edgetune_trainer *trainer = NULL;
    edgetune_adapter *adapter = NULL;
    int rc = 0;

    /* Every call returns a status; handles come back through out-pointers and are freed by us. */
    if (edgetune_context_new(NULL, &ctx) != EDGETUNE_OK) return fail("opening the GPU");
    if (edgetune_model_load(ctx, argv[1], EDGETUNE_QUANT_GGUF, 1024, &model) != EDGETUNE_OK) {
        rc = fail("loading the model");
        goto done;
    }
    /* Settings are JSON with the names of the TOML config (any field may be left out). */
    const char *settings = "{\"epochs\": 2, \"learning_rate\": 0.002, \"lora\": {\"r\": 8, \"alpha\": 16},"
                           " \"data\": {\"max_len\": 256}, \"batch_tokens\": 256}";
    if (edgetune_trainer_new(model, settings, &trainer) != EDGETUNE_OK ||
        edgetune_trainer_add_file(trainer, argv[2]) != EDGETUNE_OK) {
        rc = fail("preparing training");
        goto done;
    }
    /* Records can also come straight from the app's own store, one JSON object each. */
    edgetune_trainer_add_record(trainer, "{\"messages\": [{\"role\": \"user\", \"content\": \"Who are you?\"},"
                                         " {\"role\": \"assistant\", \"content\": \"Your own assistant.\"}]}");
    /* edgetune_trainer_cancel(trainer) from another thread (a Cancel button) stops this early. */
    if (edgetune_trainer_run(trainer, on_event, NULL) != EDGETUNE_OK) {
        rc = fail("training");
        goto done;
    }
    if (edgetune_trainer_save_adapter(trainer, argv[3]) != EDGETUNE_OK) {
        rc = fail("saving the adapter");
        goto done;
    }
    printf("PEFT adapter written to %s\n", argv[3]);

    /* Use the adapter at once, unmerged, and stream an answer. */
    if (edgetune_trainer_adapter(trainer, &adapter) != EDGETUNE_OK ||
        edgetune_model_set_adapter(model, adapter) != EDGETUNE_OK ||
        edgetune_generate(model, "Who are you?", "{\"chat\": true, \"max_new_tokens\": 32}", on_token, NULL, NULL) !=
            EDGETUNE_OK) {
        rc = fail("generating");
        goto done;
    }
    printf("\n");

done:
    /* The *_free functions accept NULL. */
    edgetune_adapter_free(adapter);
    edgetune_trainer_free(trainer);
    edgetune_model_free(model);
    edgetune_context_free(ctx);
    return rc;
}
