# mask-rcnn_kw1x-resnet50_fpn_1x_coco.py trained with the paper's detection recipe
# (_base_/paper_detection_recipe.py: AdamW 1e-4, wd 0.05, multi-scale + crop).
_base_ = ['./mask-rcnn_kw1x-resnet50_fpn_1x_coco.py', './_base_/paper_detection_recipe.py']
train_dataloader = dict(dataset=dict(pipeline={{_base_.paper_train_pipeline}}))
optim_wrapper = {{_base_.paper_optim_wrapper}}
param_scheduler = {{_base_.paper_param_scheduler}}
