// The addition-task stream.
#include "models/data.h"

#include <cmath>
#include <vector>

#include "runtime/error.h"

namespace remat {

AdditionTask::AdditionTask(int64_t vocab, uint64_t seed) : vocab_(vocab), rng_(seed) {
  REMAT_CHECK(vocab >= kAlphabet, "addition task: expected a vocabulary of at least ", kAlphabet, " tokens, got ", vocab);
}

std::pair<Tensor, Tensor> AdditionTask::batch(int64_t batch, int64_t seq_len) {
  std::vector<int64_t> inputs(batch * seq_len), targets(batch * seq_len);
  for (int64_t b = 0; b < batch; ++b) {
    // A window starting at a random phase of the problem stream.
    std::vector<int64_t> stream;
    int64_t phase = rng_.next_bits() % kProblemLength;
    while (static_cast<int64_t>(stream.size()) < phase + seq_len + 1) {
      int a = static_cast<int>(rng_.next_bits() % 1000), c = static_cast<int>(rng_.next_bits() % 1000);
      int s = a + c;
      int digits[] = {a / 100, a / 10 % 10, a % 10, 10, c / 100, c / 10 % 10, c % 10, 11,
                      s / 1000, s / 100 % 10, s / 10 % 10, s % 10, 12};
      stream.insert(stream.end(), std::begin(digits), std::end(digits));
    }
    for (int64_t t = 0; t < seq_len; ++t) {
      inputs[b * seq_len + t] = stream[phase + t];
      targets[b * seq_len + t] = stream[phase + t + 1];
    }
  }
  return {Tensor::from_vector(inputs, {batch, seq_len}), Tensor::from_vector(targets, {batch, seq_len})};
}

double AdditionTask::reference_loss() { return 6.0 * std::log(10.0) / kProblemLength; }
double AdditionTask::uniform_loss() const { return std::log(static_cast<double>(vocab_)); }

std::string AdditionTask::decode(const Tensor& ids) {
  std::string out;
  for (int64_t id : ids.to_vector<int64_t>()) out += id < 10 ? static_cast<char>('0' + id) : id == 10 ? '+' : id == 11 ? '=' : id == 12 ? ';' : '?';
  return out;
}

}  // namespace remat
