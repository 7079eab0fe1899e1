// Personalizes a model from C++ through edgetune's C interface: loads the model, trains a LoRA
// adapter on the data for a few steps, and answers a question with it. The C handles live in
// std::unique_ptr with their free functions, so every path out of main frees them.
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>

#include <edgetune.h>

namespace {

// The last failure on this thread, as an exception that says what was being done.
void check(edgetune_status s, const char *what) {
    if (s == EDGETUNE_OK) return;
    char msg[1024];
    edgetune_last_error_message(msg, sizeof msg);
    throw std::runtime_error(std::string(what) + ": " + msg);
}

template <typename T, void (*Free)(T *)>
struct Deleter {
    void operator()(T *p) const { Free(p); }
};
using Context = std::unique_ptr<edgetune_context, Deleter<edgetune_context, edgetune_context_free>>;
using Model = std::unique_ptr<edgetune_model, Deleter<edgetune_model, edgetune_model_free>>;
using Trainer = std::unique_ptr<edgetune_trainer, Deleter<edgetune_trainer, edgetune_trainer_free>>;
using Adapter = std::unique_ptr<edgetune_adapter, Deleter<edgetune_adapter, edgetune_adapter_free>>;

}  // namespace

int main(int argc, char **argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s MODEL DATA.jsonl QUESTION [STEPS]\n", argv[0]);
        return 2;
    }
    const std::string steps = argc > 4 ? argv[4] : "30";
    try {
        std::printf("edgetune %s (header %u.%u.%u)\n", edgetune_version(), EDGETUNE_VERSION_MAJOR,
                    EDGETUNE_VERSION_MINOR, EDGETUNE_VERSION_PATCH);
        edgetune_context *c = nullptr;
        check(edgetune_context_new(nullptr, &c), "opening the GPU");
        Context ctx(c);
        edgetune_model *m = nullptr;
        check(edgetune_model_load(ctx.get(), argv[1], EDGETUNE_QUANT_NF4, 512, &m), "loading the model");
        Model model(m);

        // Settings left out are chosen from the data.
        const std::string settings = "{\"max_steps\": " + steps + "}";
        edgetune_trainer *t = nullptr;
        check(edgetune_trainer_new(model.get(), settings.c_str(), &t), "preparing training");
        Trainer trainer(t);
        check(edgetune_trainer_add_file(trainer.get(), argv[2]), "reading the data");
        auto on_event = [](void *, const edgetune_event *e) {
            if (e->kind == EDGETUNE_EVENT_STEP)
                std::printf("step %llu/%llu loss %.3f\n", static_cast<unsigned long long>(e->step),
                            static_cast<unsigned long long>(e->total_steps), e->loss);
        };
        check(edgetune_trainer_run(trainer.get(), on_event, nullptr), "training");

        edgetune_adapter *a = nullptr;
        check(edgetune_trainer_adapter(trainer.get(), &a), "taking the adapter");
        Adapter adapter(a);
        check(edgetune_model_set_adapter(model.get(), adapter.get()), "applying the adapter");
        std::string answer;
        auto on_token = [](void *out, const char *piece) {
            static_cast<std::string *>(out)->append(piece);
            return 1;
        };
        check(edgetune_generate(model.get(), argv[3], "{\"chat\": true, \"max_new_tokens\": 24}", on_token, &answer,
                                nullptr),
              "generating");
        std::printf("answer: %s\n", answer.c_str());
    } catch (const std::exception &e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    return 0;
}
