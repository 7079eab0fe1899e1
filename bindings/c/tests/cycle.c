/* The whole cycle on a tiny model: load, generate, train on a data file plus records from
 * memory with a progress callback, save a checkpoint and a PEFT adapter, load the adapter back,
 * switch between it and the base model, resume from the checkpoint, train with DPO on preference
 * pairs from memory (rewards in the step events), train scoring held-out answers at each
 * evaluation, and free everything.
 * Usage: cycle MODEL_DIR DATA_FILE WORK_DIR */
#include <math.h>

#include "check.h"

typedef struct {
    int started, steps, evals, checkpoints, finished;
    float first_loss, last_loss;
    char reason[32];
} counts;

static void on_event(void *userdata, const edgetune_event *e) {
    counts *c = userdata;
    switch (e->kind) {
    case EDGETUNE_EVENT_STARTED:
        c->started++;
        /* The settings the config left out, chosen from the data: a random share of a small
         * set does not choose the adapter, so the final one is kept. */
        CHECK(e->message != NULL && strstr(e->message, "warmup_steps = ") != NULL);
        CHECK(strstr(e->message, "keep_best = false (") != NULL);
        break;
    case EDGETUNE_EVENT_STEP:
        if (c->steps++ == 0) c->first_loss = e->loss;
        c->last_loss = e->loss;
        CHECK(isfinite(e->loss) && e->lr > 0 && e->tokens_per_s > 0 && e->total_steps == 8);
        break;
    case EDGETUNE_EVENT_EVAL:
        c->evals++;
        CHECK(isfinite(e->val_loss) && isnan(e->answers_f1)); /* no answers scored here */
        break;
    case EDGETUNE_EVENT_CHECKPOINT: c->checkpoints++; CHECK(e->message != NULL); break;
    case EDGETUNE_EVENT_FINISHED:
        c->finished++;
        snprintf(c->reason, sizeof c->reason, "%s", e->message);
        break;
    default: break;
    }
}

/* DPO steps: the policy starts as the reference (loss log 2, rewards 0), then prefers the chosen
 * answers; supervised steps report no rewards (NaN). */
typedef struct {
    int steps;
    float last_margin, last_accuracy;
} dpo_counts;

static void on_dpo_event(void *userdata, const edgetune_event *e) {
    dpo_counts *c = userdata;
    if (e->kind != EDGETUNE_EVENT_STEP) return;
    if (c->steps++ == 0) CHECK(fabsf(e->loss - logf(2.0f)) < 1e-5f && e->reward_chosen == 0.0f);
    CHECK(isfinite(e->reward_margin) && isfinite(e->reward_rejected));
    c->last_margin = e->reward_margin;
    c->last_accuracy = e->reward_accuracy;
}

/* Evaluations of a trainer that scores answers carry the base's and the adapter's mean scores
 * (the base's the same at every one); other events carry NaN. */
typedef struct {
    int evals;
    double base_f1, f1;
} answer_counts;

static void on_answers_event(void *userdata, const edgetune_event *e) {
    answer_counts *c = userdata;
    if (e->kind != EDGETUNE_EVENT_EVAL) {
        CHECK(isnan(e->answers_base_exact) && isnan(e->answers_rouge_l));
        return;
    }
    double all[] = {e->answers_base_exact, e->answers_base_f1, e->answers_base_rouge_l,
                    e->answers_exact,      e->answers_f1,      e->answers_rouge_l};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) CHECK(all[i] >= 0.0 && all[i] <= 1.0);
    if (c->evals++ > 0) CHECK(e->answers_base_f1 == c->base_f1);
    c->base_f1 = e->answers_base_f1;
    c->f1 = e->answers_f1;
}

static const char *DPO_CONFIG =
    "{\"method\": \"dpo\", \"dpo\": {\"beta\": 0.1}, \"max_steps\": 4, \"learning_rate\": 0.01,"
    " \"lr_schedule\": \"constant\", \"batch_tokens\": 128, \"lora\": {\"r\": 4, \"alpha\": 8}}";

static const char *PAIRS[] = {
    "{\"prompt\": [{\"role\": \"user\", \"content\": \"Where do you keep your boat?\"}],"
    " \"chosen\": [{\"role\": \"assistant\", \"content\": \"In the cove below the lamp.\"}],"
    " \"rejected\": [{\"role\": \"assistant\", \"content\": \"I have no boat.\"}]}",
    "{\"prompt\": \"My favourite colour is\", \"chosen\": \" lighthouse red.\", \"rejected\": \" blue.\"}",
};

static int pieces;
static int on_token(void *userdata, const char *piece) {
    (void)userdata;
    CHECK(piece != NULL);
    pieces++;
    return 1;
}

/* Each request's pieces of edgetune_generate_many, appended to its own buffer. */
typedef struct {
    char text[2][1024];
} many_texts;
static int on_request_token(void *userdata, size_t request, const char *piece) {
    many_texts *m = userdata;
    CHECK(request < 2 && piece != NULL);
    CHECK(strlen(m->text[request]) + strlen(piece) < sizeof m->text[request]);
    strcat(m->text[request], piece);
    return 1;
}

/* Each request's pieces and end as edgetune_generate_many_each tells them: its pieces, its
 * result JSON, and how many requests had ended when its first piece came. */
typedef struct {
    many_texts texts;
    char result[2][2048];
    int ended, ended_before_first[2], pieces[2];
} many_ends;
static int on_each_token(void *userdata, size_t request, const char *piece) {
    many_ends *m = userdata;
    CHECK(request < 2);
    if (m->pieces[request]++ == 0) m->ended_before_first[request] = m->ended;
    return on_request_token(&m->texts, request, piece);
}
static void on_each_end(void *userdata, size_t request, const char *result_json) {
    many_ends *m = userdata;
    CHECK(request < 2 && result_json != NULL && m->result[request][0] == 0);
    CHECK(strlen(result_json) < sizeof m->result[request]);
    strcpy(m->result[request], result_json);
    m->ended++;
}

/* No checkpoint by time (600 s by default): under valgrind the steps can take longer than
 * that, and the run below expects its one checkpoint, the one at the end. */
static const char *CONFIG =
    "{\"max_steps\": 8, \"learning_rate\": 0.01, \"lr_schedule\": \"constant\", \"batch_tokens\": 128,"
    " \"checkpoint_every_s\": 0, \"eval_every\": 4, \"seed\": 5, \"lora\": {\"r\": 4, \"alpha\": 8},"
    " \"data\": {\"max_len\": 128, \"val_fraction\": 0.2}}";

static const char *RECORDS[] = {
    "{\"messages\": [{\"role\": \"user\", \"content\": \"What is your favourite colour?\"},"
    " {\"role\": \"assistant\", \"content\": \"Lighthouse red, like my tower.\"}]}",
    "{\"instruction\": \"Where do you keep your boat?\", \"output\": \"In the cove below the lamp.\"}",
};

static edgetune_trainer *new_trainer(edgetune_model *model, const char *data) {
    edgetune_trainer *t = NULL;
    OK(edgetune_trainer_new(model, CONFIG, &t));
    OK(edgetune_trainer_add_file(t, data));
    for (size_t i = 0; i < sizeof RECORDS / sizeof *RECORDS; i++) OK(edgetune_trainer_add_record(t, RECORDS[i]));
    return t;
}

int main(int argc, char **argv) {
    CHECK(argc == 4);
    char ckpt[4096], adapter_dir[4096];
    snprintf(ckpt, sizeof ckpt, "%s/run.ckpt", argv[3]);
    snprintf(adapter_dir, sizeof adapter_dir, "%s/adapter", argv[3]);
    const char *probe = "In the cove below the lamp.";

    edgetune_context *ctx = NULL;
    OK(edgetune_context_new(NULL, &ctx));
    char *about = NULL;
    OK(edgetune_context_describe(ctx, &about));
    printf("adapter: %s\n", about);
    edgetune_string_free(about);
    edgetune_model *model = NULL;
    OK(edgetune_model_load(ctx, argv[1], EDGETUNE_QUANT_NF4, 512, &model));
    edgetune_context_free(ctx); /* the model keeps what it needs */

    char *before = NULL;
    OK(edgetune_generate(model, "Where do you keep your boat?", "{\"max_new_tokens\": 6, \"chat\": true}", on_token,
                         NULL, &before));
    CHECK(pieces > 0);
    float base_loss = 0;
    OK(edgetune_model_loss(model, probe, &base_loss));

    /* Train 8 steps with a checkpoint at the end. */
    edgetune_trainer *t = new_trainer(model, argv[2]);
    OK(edgetune_trainer_set_checkpoint_path(t, ckpt));
    char *settings = NULL;
    OK(edgetune_trainer_settings(t, &settings));
    printf("settings: %s\n", settings);
    CHECK(strstr(settings, "\"max_steps\":8") != NULL && strstr(settings, "\"setting\":\"warmup_steps\"") != NULL);
    CHECK(strstr(settings, "\"keep_best\":false") != NULL);
    edgetune_string_free(settings);
    counts c = {0};
    OK(edgetune_trainer_run(t, on_event, &c));
    printf("steps %d, loss %.4f -> %.4f, evals %d, finished: %s\n", c.steps, c.first_loss, c.last_loss, c.evals,
           c.reason);
    CHECK(c.started == 1 && c.steps == 8 && c.evals == 2 && c.checkpoints == 1 && c.finished == 1);
    CHECK(strcmp(c.reason, "completed") == 0);
    CHECK(c.last_loss < c.first_loss);
    OK(edgetune_trainer_save_adapter(t, adapter_dir));
    char saved[4096];
    snprintf(saved, sizeof saved, "%s/saved.ckpt", argv[3]);
    OK(edgetune_trainer_save_checkpoint(t, saved));

    /* The adapter, loaded back from its PEFT folder, changes the model; NULL switches back. */
    edgetune_adapter *trained = NULL, *loaded = NULL;
    OK(edgetune_trainer_adapter(t, &trained));
    OK(edgetune_adapter_load(model, adapter_dir, &loaded));
    float with_trained = 0, with_loaded = 0, base_again = 0;
    OK(edgetune_model_set_adapter(model, trained));
    OK(edgetune_model_loss(model, probe, &with_trained));
    OK(edgetune_model_set_adapter(model, loaded));
    OK(edgetune_model_loss(model, probe, &with_loaded));
    char *after = NULL;
    OK(edgetune_generate(model, "Where do you keep your boat?", "{\"max_new_tokens\": 6, \"chat\": true}", NULL, NULL,
                         &after));
    OK(edgetune_model_set_adapter(model, NULL));
    OK(edgetune_model_loss(model, probe, &base_again));
    printf("loss of a trained answer: base %.4f, trained adapter %.4f, loaded adapter %.4f\n", base_loss,
           with_trained, with_loaded);
    printf("before: \"%s\"\nafter:  \"%s\"\n", before, after);
    CHECK(with_trained < base_loss);
    CHECK(with_loaded == with_trained);
    CHECK(base_again == base_loss);

    /* As a GGUF LoRA file (f32: the same values) it loads back to the same loss. */
    char gguf[4096];
    snprintf(gguf, sizeof gguf, "%s/adapter.gguf", argv[3]);
    OK(edgetune_adapter_save_gguf(model, loaded, gguf, "f32"));
    CHECK(edgetune_adapter_save_gguf(model, loaded, gguf, "q2_k") == EDGETUNE_ERROR_INVALID_ARGUMENT);
    edgetune_adapter *from_gguf = NULL;
    float with_gguf = 0;
    OK(edgetune_adapter_load(model, gguf, &from_gguf));
    OK(edgetune_model_set_adapter(model, from_gguf));
    OK(edgetune_model_loss(model, probe, &with_gguf));
    OK(edgetune_model_set_adapter(model, NULL));
    CHECK(with_gguf == with_trained);

    /* Kept resident by name, it answers for the calls that name it as when it is applied. */
    const char *boat = "Where do you keep your boat?";
    char *applied = NULL, *by_name = NULL;
    OK(edgetune_model_set_adapter(model, from_gguf));
    OK(edgetune_generate(model, boat, "{\"max_new_tokens\": 6, \"chat\": true}", NULL, NULL, &applied));
    OK(edgetune_model_set_adapter(model, NULL));
    OK(edgetune_model_keep_adapter(model, "tuned", from_gguf));
    OK(edgetune_generate(model, boat, "{\"max_new_tokens\": 6, \"chat\": true, \"adapter\": \"tuned\"}", NULL,
                         NULL, &by_name));
    CHECK(strcmp(applied, by_name) == 0);
    CHECK(edgetune_generate(model, boat, "{\"adapter\": \"nobody\"}", NULL, NULL, NULL) ==
          EDGETUNE_ERROR_INVALID_ARGUMENT);
    /* Two users at once, one with the adapter and one on the base model: each answer is what
     * it is alone. */
    char requests[512], *results = NULL;
    snprintf(requests, sizeof requests, "[{\"prompt\": \"%s\", \"adapter\": \"tuned\"}, {\"prompt\": \"%s\"}]", boat,
             boat);
    many_texts many = {0};
    OK(edgetune_generate_many(model, requests, "{\"max_new_tokens\": 6, \"chat\": true}", on_request_token, &many,
                              &results));
    printf("many: %s\n", results);
    CHECK(strcmp(many.text[0], by_name) == 0);
    CHECK(strcmp(many.text[1], before) == 0);
    CHECK(strstr(results, "\"stop_reason\"") != NULL);
    /* The same requests in one row: the first ends, and is told with its result, before the
     * second streams; each result is the one the array holds. */
    char *each = NULL;
    many_ends ends = {0};
    OK(edgetune_generate_many_each(model, requests, "{\"max_new_tokens\": 6, \"chat\": true, \"rows\": 1}",
                                   on_each_token, on_each_end, &ends, &each));
    CHECK(strcmp(each, results) == 0);
    CHECK(ends.ended == 2 && ends.ended_before_first[0] == 0 && ends.ended_before_first[1] == 1);
    CHECK(strcmp(ends.texts.text[0], by_name) == 0 && strcmp(ends.texts.text[1], before) == 0);
    char joined[4200];
    snprintf(joined, sizeof joined, "[%s,%s]", ends.result[0], ends.result[1]);
    CHECK(strcmp(joined, results) == 0);
    edgetune_string_free(each);
    edgetune_string_free(results);
    CHECK(edgetune_generate_many(model, "[{\"prompt\": \"hi\", \"adapter\": \"nobody\"}]", NULL, NULL, NULL,
                                 &results) == EDGETUNE_ERROR_INVALID_ARGUMENT);
    CHECK(results == NULL);
    OK(edgetune_model_drop_adapter(model, "tuned"));
    CHECK(edgetune_model_drop_adapter(model, "tuned") == EDGETUNE_ERROR_INVALID_ARGUMENT);
    edgetune_string_free(applied);
    edgetune_string_free(by_name);
    edgetune_adapter_free(from_gguf);
    edgetune_string_free(before);
    edgetune_string_free(after);
    edgetune_adapter_free(trained);
    edgetune_adapter_free(loaded);

    /* A new trainer resumed from either checkpoint has nothing left to do and gives the same
     * adapter. */
    edgetune_trainer *from_saved = new_trainer(model, argv[2]);
    OK(edgetune_trainer_resume(from_saved, saved));
    edgetune_trainer_free(from_saved);
    edgetune_trainer *resumed = new_trainer(model, argv[2]);
    OK(edgetune_trainer_resume(resumed, ckpt));
    counts r = {0};
    OK(edgetune_trainer_run(resumed, on_event, &r));
    CHECK(r.steps == 0 && r.finished == 1);
    edgetune_adapter *again = NULL;
    OK(edgetune_trainer_adapter(resumed, &again));
    OK(edgetune_model_set_adapter(model, again));
    float with_resumed = 0;
    OK(edgetune_model_loss(model, probe, &with_resumed));
    CHECK(with_resumed == with_trained);
    edgetune_adapter_free(again);

    edgetune_trainer_free(resumed);
    edgetune_trainer_free(t);

    edgetune_trainer *dpo = NULL;
    OK(edgetune_trainer_new(model, DPO_CONFIG, &dpo));
    for (size_t i = 0; i < sizeof PAIRS / sizeof *PAIRS; i++) OK(edgetune_trainer_add_record(dpo, PAIRS[i]));
    dpo_counts d = {0};
    OK(edgetune_trainer_run(dpo, on_dpo_event, &d));
    CHECK(d.steps == 4 && d.last_margin > 0.0f && d.last_accuracy == 1.0f);
    edgetune_trainer_free(dpo);

    edgetune_trainer *scored = new_trainer(model, argv[2]);
    FAILS(edgetune_trainer_score_answers(scored, "[{\"text\": \"no answer here\"}]", NULL),
          EDGETUNE_ERROR_FORMAT, "line 1");
    const char *held_out =
        "[{\"messages\": [{\"role\": \"user\", \"content\": \"Where do you keep your boat?\"},"
        " {\"role\": \"assistant\", \"content\": \"In the cove below the lamp.\"}]}]";
    OK(edgetune_trainer_score_answers(scored, held_out, "{\"max_new_tokens\": 6}"));
    answer_counts a = {0};
    OK(edgetune_trainer_run(scored, on_answers_event, &a));
    CHECK(a.evals == 2);
    edgetune_trainer_free(scored);

    edgetune_model_free(model);
    printf("cycle: ok\n");
    return 0;
}
