/* Every error path: NULL arguments, bad settings, missing files, bad data, calls out of order,
 * and the error-message buffer. Each failure must be its status plus a message that names the
 * argument, field, file or line. Usage: errors MODEL_DIR DATA_FILE WORK_DIR */
#include "check.h"

int main(int argc, char **argv) {
    CHECK(argc == 4);

    /* NULL arguments name the argument; *_free(NULL) does nothing. */
    edgetune_context *ctx = NULL;
    FAILS(edgetune_context_new(NULL, NULL), EDGETUNE_ERROR_NULL_ARGUMENT, "`out` is NULL");
    FAILS(edgetune_context_describe(NULL, NULL), EDGETUNE_ERROR_NULL_ARGUMENT, "`out` is NULL");
    char *s = NULL;
    FAILS(edgetune_context_describe(NULL, &s), EDGETUNE_ERROR_NULL_ARGUMENT, "`ctx` is NULL");
    edgetune_model *model = NULL;
    FAILS(edgetune_model_load(NULL, argv[1], EDGETUNE_QUANT_NF4, 0, &model), EDGETUNE_ERROR_NULL_ARGUMENT,
          "`ctx` is NULL");
    edgetune_context_free(NULL);
    edgetune_model_free(NULL);
    edgetune_trainer_free(NULL);
    edgetune_adapter_free(NULL);
    edgetune_string_free(NULL);

    OK(edgetune_context_new(NULL, &ctx));
    edgetune_context *other = NULL;
    FAILS(edgetune_context_new("no such adapter name", &other), EDGETUNE_ERROR_NO_GPU, "no such adapter name");
    CHECK(other == NULL);
    FAILS(edgetune_model_load(ctx, NULL, EDGETUNE_QUANT_NF4, 0, &model), EDGETUNE_ERROR_NULL_ARGUMENT,
          "`path` is NULL");
    FAILS(edgetune_model_load(ctx, "/no/such/model.gguf", EDGETUNE_QUANT_NF4, 0, &model), EDGETUNE_ERROR_IO,
          "/no/such/model.gguf");
    FAILS(edgetune_model_load(ctx, argv[1], 7, 0, &model), EDGETUNE_ERROR_INVALID_ARGUMENT,
          "quant 7 is not an edgetune_quant value");
    FAILS(edgetune_model_load(ctx, argv[2], EDGETUNE_QUANT_NF4, 0, &model), EDGETUNE_ERROR_FORMAT, "not a GGUF file");
    CHECK(model == NULL);
    OK(edgetune_model_load(ctx, argv[1], EDGETUNE_QUANT_NF4, 256, &model));

    /* Generation. */
    FAILS(edgetune_generate(model, NULL, NULL, NULL, NULL, NULL), EDGETUNE_ERROR_NULL_ARGUMENT, "`prompt` is NULL");
    FAILS(edgetune_generate(model, "", NULL, NULL, NULL, NULL), EDGETUNE_ERROR_INVALID_ARGUMENT, "prompt");
    FAILS(edgetune_generate(model, "Hi", "{\"max_tokens\": 3}", NULL, NULL, NULL), EDGETUNE_ERROR_INVALID_ARGUMENT,
          "unknown field `max_tokens`");
    FAILS(edgetune_generate(model, "Hi", "{\"top_p\": 2}", NULL, NULL, NULL), EDGETUNE_ERROR_INVALID_ARGUMENT,
          "top_p 2 must be in (0, 1]");
    FAILS(edgetune_generate(model, "Hi", "{\"system\": \"x\"}", NULL, NULL, NULL), EDGETUNE_ERROR_INVALID_ARGUMENT,
          "needs \"chat\": true");
    FAILS(edgetune_generate(model, "Hi", "not json", NULL, NULL, NULL), EDGETUNE_ERROR_INVALID_ARGUMENT,
          "options_json");
    char *results = NULL;
    FAILS(edgetune_generate_many(model, NULL, NULL, NULL, NULL, &results), EDGETUNE_ERROR_NULL_ARGUMENT,
          "`requests_json` is NULL");
    FAILS(edgetune_generate_many(model, "[{\"prompt\": \"Hi\"}]", NULL, NULL, NULL, NULL),
          EDGETUNE_ERROR_NULL_ARGUMENT, "`out_results_json` is NULL");
    FAILS(edgetune_generate_many(model, "[{\"text\": \"Hi\"}]", NULL, NULL, NULL, &results),
          EDGETUNE_ERROR_INVALID_ARGUMENT, "requests_json");
    FAILS(edgetune_generate_many(model, "[{\"prompt\": \"\"}]", NULL, NULL, NULL, &results),
          EDGETUNE_ERROR_INVALID_ARGUMENT, "request 0");
    FAILS(edgetune_generate_many(model, "[{\"prompt\": \"Hi\"}]", "{\"adapter\": \"x\"}", NULL, NULL, &results),
          EDGETUNE_ERROR_INVALID_ARGUMENT, "requests_json");
    FAILS(edgetune_generate_many(model, "[{\"prompt\": \"Hi\"}]", "{\"rows\": -1}", NULL, NULL, &results),
          EDGETUNE_ERROR_INVALID_ARGUMENT, "`rows` must be a whole number");
    FAILS(edgetune_generate_many_each(model, "[{\"prompt\": \"Hi\"}]", "{\"rows\": \"2\"}", NULL, NULL, NULL,
                                      &results),
          EDGETUNE_ERROR_INVALID_ARGUMENT, "`rows` must be a whole number");
    FAILS(edgetune_generate(model, "Hi", "{\"rows\": 2}", NULL, NULL, NULL), EDGETUNE_ERROR_INVALID_ARGUMENT,
          "`rows` is taken by edgetune_generate_many only");
    CHECK(results == NULL);
    float loss = 0;
    FAILS(edgetune_model_loss(model, "Hi", NULL), EDGETUNE_ERROR_NULL_ARGUMENT, "`out` is NULL");
    const char bad_utf8[] = {'H', (char)0xff, 'i', 0};
    FAILS(edgetune_model_loss(model, bad_utf8, &loss), EDGETUNE_ERROR_INVALID_ARGUMENT, "not UTF-8");

    /* Scored answers: the records must be an array of conversations ending in the answer. */
    char *report = NULL;
    FAILS(edgetune_score_answers(model, "[]", NULL, NULL), EDGETUNE_ERROR_NULL_ARGUMENT, "`out_report_json` is NULL");
    FAILS(edgetune_score_answers(model, "{}", NULL, &report), EDGETUNE_ERROR_INVALID_ARGUMENT, "a JSON array");
    FAILS(edgetune_score_answers(model, "[{\"text\": \"x\"}]", NULL, &report), EDGETUNE_ERROR_FORMAT,
          "line 1: a plain text has no reference answer");
    FAILS(edgetune_score_answers(model, "[]", "{\"adapter\": \"a\"}", &report), EDGETUNE_ERROR_INVALID_ARGUMENT,
          "`adapter` is not taken here");
    CHECK(report == NULL);

    /* Adapters. */
    edgetune_adapter *adapter = NULL;
    FAILS(edgetune_adapter_load(model, "/no/such/adapter", &adapter), EDGETUNE_ERROR_IO, "/no/such/adapter");
    FAILS(edgetune_adapter_save(NULL, argv[3], NULL), EDGETUNE_ERROR_NULL_ARGUMENT, "`adapter` is NULL");
    FAILS(edgetune_model_set_adapter(NULL, NULL), EDGETUNE_ERROR_NULL_ARGUMENT, "`model` is NULL");

    /* Training settings and data. */
    edgetune_trainer *t = NULL;
    FAILS(edgetune_trainer_new(model, "{\"epochz\": 3}", &t), EDGETUNE_ERROR_INVALID_ARGUMENT,
          "unknown field `epochz`");
    FAILS(edgetune_trainer_new(model, "{\"learning_rate\": -1}", &t), EDGETUNE_ERROR_INVALID_ARGUMENT,
          "learning_rate must be a finite number > 0 (got -1)");
    FAILS(edgetune_trainer_new(model, "{\"lora\": {\"r\": \"four\"}}", &t), EDGETUNE_ERROR_INVALID_ARGUMENT,
          "config_json");
    FAILS(edgetune_trainer_new(NULL, NULL, &t), EDGETUNE_ERROR_NULL_ARGUMENT, "`model` is NULL");
    CHECK(t == NULL);
    OK(edgetune_trainer_new(model, "{\"max_steps\": 1, \"batch_tokens\": 128, \"data\": {\"max_len\": 128}}", &t));
    FAILS(edgetune_trainer_run(t, NULL, NULL), EDGETUNE_ERROR_INVALID_ARGUMENT, "the trainer has no data");
    FAILS(edgetune_trainer_add_file(t, "/no/such/data.jsonl"), EDGETUNE_ERROR_IO, "/no/such/data.jsonl");
    FAILS(edgetune_trainer_add_record(t, NULL), EDGETUNE_ERROR_NULL_ARGUMENT, "`record_json` is NULL");
    OK(edgetune_trainer_add_record(
        t, "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}"));
    OK(edgetune_trainer_add_record(t, "{\"instruction\": 3}"));
    FAILS(edgetune_trainer_run(t, NULL, NULL), EDGETUNE_ERROR_FORMAT, "records: line 2: `instruction` should be a string");
    FAILS(edgetune_trainer_resume(t, "/no/such/run.ckpt"), EDGETUNE_ERROR_FORMAT, "records: line 2: `instruction` should be a string");
    FAILS(edgetune_trainer_cancel(NULL), EDGETUNE_ERROR_NULL_ARGUMENT, "`trainer` is NULL");
    edgetune_trainer_free(t);

    /* A trainer with good data: a missing checkpoint is an I/O error naming it, and data
     * cannot be added once training has started. */
    OK(edgetune_trainer_new(model, "{\"max_steps\": 1, \"batch_tokens\": 128, \"data\": {\"max_len\": 128}}", &t));
    OK(edgetune_trainer_add_file(t, argv[2]));
    FAILS(edgetune_trainer_resume(t, "/no/such/run.ckpt"), EDGETUNE_ERROR_IO, "/no/such/run.ckpt");
    FAILS(edgetune_trainer_add_file(t, argv[2]), EDGETUNE_ERROR_INVALID_ARGUMENT, "its data is fixed");
    edgetune_trainer_free(t);

    /* The message buffer: the full length is returned, a short buffer gets a truncated,
     * NUL-terminated prefix, and a NULL buffer of length 0 only asks for the length. */
    FAILS(edgetune_trainer_add_file(NULL, argv[2]), EDGETUNE_ERROR_NULL_ARGUMENT, "`trainer` is NULL");
    size_t n = edgetune_last_error_message(NULL, 0);
    CHECK(n == strlen("`trainer` is NULL"));
    char small[5];
    CHECK(edgetune_last_error_message(small, sizeof small) == n);
    CHECK(strcmp(small, "`tra") == 0);

    edgetune_model_free(model);
    edgetune_context_free(ctx);
    printf("errors: ok\n");
    return 0;
}
