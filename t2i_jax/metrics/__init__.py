"""Image and text-image metrics: `init / update / merge / compute` over pytrees."""
