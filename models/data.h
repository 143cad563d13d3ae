// Synthetic training data generated in code with a fixed seed: a stream of 3-digit additions
// "123+456=0579;" over a small alphabet. Operand digits are random (ln 10 nats each); every other
// character is determined by what came before, so the best achievable loss is 6 ln(10) / 13
// = 1.063 nats per token, far below the uniform ln(vocab).
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "../runtime/random.h"
#include "../runtime/tensor.h"

namespace remat {

class AdditionTask {
 public:
  static constexpr int kAlphabet = 13;  // '0'..'9', '+', '=', ';'
  static constexpr int kProblemLength = 13;

  AdditionTask(int64_t vocab, uint64_t seed);
  // A batch of windows into the stream: inputs [B, T] and next-token targets [B, T] (i64).
  std::pair<Tensor, Tensor> batch(int64_t batch, int64_t seq_len);
  // Best achievable mean loss per token (nats), and the loss of a uniform guess over the vocab.
  static double reference_loss();
  double uniform_loss() const;
  static std::string decode(const Tensor& ids);  // for printing samples
  RngState state() const { return rng_.state(); }
  void set_state(RngState s) { rng_.set_state(s); }

 private:
  int64_t vocab_;
  RandomStream rng_;
};

}  // namespace remat
