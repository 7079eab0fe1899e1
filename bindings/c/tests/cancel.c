/* Cancellation from a second thread: the trainer is told to run 1000 steps; a watcher thread
 * waits until the first step is reported and cancels. The run returns EDGETUNE_OK with a
 * "cancelled" FINISHED event long before step 1000, and writes its checkpoint.
 * Usage: cancel MODEL_DIR DATA_FILE WORK_DIR */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <unistd.h>

#include "check.h"

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t stepped;
    int steps, checkpoints;
    char reason[32];
    edgetune_trainer *trainer;
} shared;

static void on_event(void *userdata, const edgetune_event *e) {
    shared *s = userdata;
    pthread_mutex_lock(&s->lock);
    if (e->kind == EDGETUNE_EVENT_STEP) {
        s->steps++;
        pthread_cond_signal(&s->stepped);
    } else if (e->kind == EDGETUNE_EVENT_CHECKPOINT) {
        s->checkpoints++;
    } else if (e->kind == EDGETUNE_EVENT_FINISHED) {
        snprintf(s->reason, sizeof s->reason, "%s", e->message);
    }
    pthread_mutex_unlock(&s->lock);
}

static void *watcher(void *arg) {
    shared *s = arg;
    pthread_mutex_lock(&s->lock);
    while (s->steps == 0) pthread_cond_wait(&s->stepped, &s->lock);
    pthread_mutex_unlock(&s->lock);
    OK(edgetune_trainer_cancel(s->trainer));
    return NULL;
}

int main(int argc, char **argv) {
    CHECK(argc == 4);
    char ckpt[4096];
    snprintf(ckpt, sizeof ckpt, "%s/cancelled.ckpt", argv[3]);
    edgetune_context *ctx = NULL;
    OK(edgetune_context_new(NULL, &ctx));
    edgetune_model *model = NULL;
    OK(edgetune_model_load(ctx, argv[1], EDGETUNE_QUANT_NF4, 512, &model));
    edgetune_trainer *t = NULL;
    OK(edgetune_trainer_new(model,
                            "{\"max_steps\": 1000, \"batch_tokens\": 128, \"lora\": {\"r\": 4, \"alpha\": 8},"
                            " \"data\": {\"max_len\": 128, \"val_fraction\": 0}}",
                            &t));
    OK(edgetune_trainer_add_file(t, argv[2]));
    OK(edgetune_trainer_set_checkpoint_path(t, ckpt));

    shared s = {.lock = PTHREAD_MUTEX_INITIALIZER, .stepped = PTHREAD_COND_INITIALIZER, .trainer = t};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, watcher, &s) == 0);
    OK(edgetune_trainer_run(t, on_event, &s));
    CHECK(pthread_join(th, NULL) == 0);
    printf("stopped after %d steps: %s\n", s.steps, s.reason);
    CHECK(strcmp(s.reason, "cancelled") == 0);
    CHECK(s.steps >= 1 && s.steps < 1000);
    CHECK(s.checkpoints == 1 && access(ckpt, F_OK) == 0);

    edgetune_trainer_free(t);
    edgetune_model_free(model);
    edgetune_context_free(ctx);
    printf("cancel: ok\n");
    return 0;
}
