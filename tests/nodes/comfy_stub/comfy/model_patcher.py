"""comfy.model_patcher: what a ModelPatcher is to model management, as in ComfyUI 0.8 (no weight patches)."""


from .patcher_extension import CallbacksMP


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.callbacks = {}
        if getattr(self.model, "device", None) is None:
            self.model.device = offload_device

    def add_callback(self, call_type, callback):
        self.callbacks.setdefault(call_type, {}).setdefault(None, []).append(callback)

    def get_all_callbacks(self, call_type):
        return [c for callbacks in self.callbacks.get(call_type, {}).values() for c in callbacks]

    def detach(self, unpatch_all=True):
        if unpatch_all:  # ComfyUI moves the weights only when it unpatches them
            self.model.to(self.offload_device)
            self.model.device = self.offload_device
        for callback in self.get_all_callbacks(CallbacksMP.ON_DETACH):
            callback(self, unpatch_all)
        return self.model

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = sum(t.nbytes for t in self.model.state_dict().values())
        return self.size

    def current_loaded_device(self):
        return self.model.device
