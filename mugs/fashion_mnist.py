"""Fashion-MNIST's class names in label order: a plain list with no imports, so that the configuration can
check ``data.classes`` without loading the data modules."""

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
