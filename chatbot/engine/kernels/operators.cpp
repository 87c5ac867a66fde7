/* The engine's operators in C++: the kernels a compiled step calls back with no Python.
 *
 * A compiled step (AOTInductor, compiled_step.py) calls the engine's operators back
 * through the dispatcher: chatbot::attend_rows (kernels/attention.py) 24 times a
 * Blenderbot-400M token, and chatbot::int8_fbgemm (kernels/int8.py) 70 times where
 * fbgemm multiplies int8. Defined in Python (torch.library.custom_op), each call took
 * about 60 us around the kernel (the proxy executor's Python calls, the GIL,
 * torch.library's layers): 4-5 ms of a 26 ms token at one conversation. Loading this
 * file's library registers CPU kernels for the same operators, which the dispatcher
 * prefers to the Python ones (those stay for tracing and where no C++ compiler is). */

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <unordered_map>

namespace {

/* attention.c's attend_rows, of the C library built for this CPU (native.py hands it
 * over): this library is built once for every instruction set. */
using AttendRows = void (*)(const float *query, int64_t query_row, int64_t query_head,
                            const void *keys, const void *values, int kv_bfloat16,
                            int64_t kv_row, int64_t kv_head, int64_t kv_position,
                            const int64_t *rows, const int64_t *lengths, int64_t n,
                            int64_t heads, int64_t group, int64_t dim, float scale, float *out,
                            int threads, float *scratch, int64_t longest);
AttendRows attend_rows = nullptr;

/* attention.py's attend_rows, argument for argument: attention.c's kernel over every row. */
at::Tensor attend(const at::Tensor &query, const at::Tensor &keys, const at::Tensor &values,
                  const at::Tensor &rows, const at::Tensor &lengths, double scale) {
    TORCH_CHECK(attend_rows != nullptr, "attention.c's kernel was not handed over");
    TORCH_CHECK(keys.strides() == values.strides() && keys.sizes() == values.sizes(),
                "keys and values must be laid out alike");
    TORCH_CHECK(keys.scalar_type() == values.scalar_type(), "keys and values must be of one dtype");
    int64_t n = query.size(0), heads = query.size(1), dim = query.size(3), width = keys.size(2);
    int threads = at::get_num_threads();
    at::Tensor out = at::empty({n, heads, 1, dim}, query.options());
    at::Tensor scratch = at::empty({threads * width}, query.options());
    at::Tensor row_of = rows.contiguous(), length_of = lengths.contiguous();
    attend_rows(query.const_data_ptr<float>(), query.stride(0), query.stride(1),
                keys.const_data_ptr(), values.const_data_ptr(),
                keys.scalar_type() == at::kBFloat16, keys.stride(0), keys.stride(1),
                keys.stride(2), row_of.const_data_ptr<int64_t>(),
                length_of.const_data_ptr<int64_t>(), n, heads, heads / keys.size(1), dim,
                static_cast<float>(scale), out.mutable_data_ptr<float>(), threads,
                scratch.mutable_data_ptr<float>(), width);
    return out;
}

/* fbgemm's packed weights by name (int8.py's FbgemmWeights keeps and forgets them):
 * a compiled step names them, it cannot hold them. */
std::mutex weights_lock;
std::unordered_map<std::string, c10::IValue> weights_named;

void keep_weights(const c10::OperatorHandle &, torch::jit::Stack *stack) {
    c10::IValue packed = torch::jit::pop(*stack);
    std::string name = torch::jit::pop(*stack).toStringRef();
    std::lock_guard<std::mutex> hold(weights_lock);
    weights_named[name] = std::move(packed);
}

/* Only the weights given: a layer of the same weights loaded since keeps them. */
void forget_weights(const c10::OperatorHandle &, torch::jit::Stack *stack) {
    c10::IValue packed = torch::jit::pop(*stack);
    std::string name = torch::jit::pop(*stack).toStringRef();
    std::lock_guard<std::mutex> hold(weights_lock);
    auto found = weights_named.find(name);
    if (found != weights_named.end() && found->second.is(packed)) weights_named.erase(found);
}

/* int8.py's fbgemm_product: the levels times the named weights, by fbgemm's own operator. */
at::Tensor fbgemm_product(const at::Tensor &levels, c10::string_view weights) {
    static const c10::OperatorHandle product = c10::Dispatcher::singleton().findSchemaOrThrow(
        "quantized::linear_with_input_q_dq_qweight_dq_output_fp32", "");
    c10::IValue packed;
    {
        std::lock_guard<std::mutex> hold(weights_lock);
        auto found = weights_named.find(std::string(weights));
        TORCH_CHECK(found != weights_named.end(), "no fbgemm weights named ", weights);
        packed = found->second;
    }
    torch::jit::Stack stack{levels, 1.0, int64_t{128}, std::move(packed)};
    product.callBoxed(&stack);
    return stack[0].toTensor();
}

}  // namespace

extern "C" void use_attention(AttendRows kernel) { attend_rows = kernel; }

TORCH_LIBRARY_FRAGMENT(chatbot, m) {
    m.def("keep_fbgemm(str name, __torch__.torch.classes.quantized.LinearPackedParamsBase packed) -> ()");
    m.def("forget_fbgemm(str name, __torch__.torch.classes.quantized.LinearPackedParamsBase packed) -> ()");
}

TORCH_LIBRARY_IMPL(chatbot, CPU, m) {
    m.impl("attend_rows", attend);
    m.impl("int8_fbgemm", fbgemm_product);
}

TORCH_LIBRARY_IMPL(chatbot, CatchAll, m) {
    m.impl("keep_fbgemm", torch::CppFunction::makeFromBoxedFunction<&keep_weights>());
    m.impl("forget_fbgemm", torch::CppFunction::makeFromBoxedFunction<&forget_weights>());
}
