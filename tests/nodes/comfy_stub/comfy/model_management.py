"""comfy.model_management: the interrupt flag and the device queries, as in ComfyUI 0.8 on a CPU."""

import threading

import torch


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def free_memory(memory_required, device, keep_loaded=[]):
    return []


def unet_offload_device():
    return torch.device("cpu")


current_loaded_models = []  # the patchers load_models_gpu placed, most recent first (ComfyUI: LoadedModel)


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    for patcher in models:
        if patcher in current_loaded_models:
            current_loaded_models.remove(patcher)
        patcher.model.to(patcher.load_device)
        patcher.model.device = patcher.load_device
        current_loaded_models.insert(0, patcher)


def unload_all_models():
    while current_loaded_models:
        current_loaded_models.pop().detach()
