"""Your own model and data in a federated simulation: about twenty lines."""

import numpy as np
from torch import nn

from fedfleet import FitConfig, Simulation
from fedfleet.data import federate, from_tensors, train_test_split

# 1. your data: any arrays or tensors (here a synthetic 3-class problem)
rng = np.random.default_rng(0)
x = rng.normal(size=(6000, 20)).astype(np.float32)
y = (x[:, :3].argmax(axis=1)).astype(np.int64)
train, test = train_test_split(from_tensors(x, y), test_fraction=0.2, seed=0)

# 2. split it over 500 virtual clients with label skew
clients = federate(train, clients=500, scheme="dirichlet", alpha=0.5, seed=0)

# 3. your model, trained by FedAvg: 50 clients a round, 2 local epochs of SGD
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
sim = Simulation.build(
    model,
    clients,
    test=test,
    strategy="fedavg",
    rounds=20,
    cohort=50,
    client=FitConfig(epochs=2, batch_size=16, lr=0.1),
    eval_every=5,
)
history = sim.run()
print(f"test accuracy after {len(history)} rounds: {history[-1].metrics['test_accuracy']:.1%}")
sim.save_model("custom_model.safetensors")
